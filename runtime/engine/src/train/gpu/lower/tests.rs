use super::*;

#[test]
fn simplify_merges_contiguous_axes() {
    // [2,3,4] contiguous collapses to one axis.
    let (d, s) = simplify(&[2, 3, 4], &[strides(&[2, 3, 4])]);
    assert_eq!((d, s), (vec![24], vec![vec![1]]));
    // A broadcast bias [1,3,1] against [2,3,4] keeps three axes.
    let (d, s) = simplify(
        &[2, 3, 4],
        &[strides(&[2, 3, 4]), broadcast_strides(&[3, 1], &[2, 3, 4])],
    );
    assert_eq!(d, vec![2, 3, 4]);
    assert_eq!(s[1], vec![0, 1, 0]);
    // Size-1 axes vanish.
    let (d, _) = simplify(&[1, 5, 1], &[vec![5, 1, 1]]);
    assert_eq!(d, vec![5]);
}

#[test]
fn groups_cover_threads() {
    assert_eq!(groups_1d(1), [1, 1, 1]);
    assert_eq!(groups_1d(257), [2, 1, 1]);
    let [x, y, _] = groups_1d(70_000 * 256);
    assert!(x <= 65_535 && (x as usize * y as usize) >= 70_000);
}

fn v(words: usize, role: Role) -> Value {
    Value {
        name: String::new(),
        words,
        ty: Ty::F32,
        role,
    }
}

fn l(inputs: Vec<usize>, output: usize) -> Launch {
    Launch {
        kernel: Kernel::Eltwise,
        params: vec![],
        inputs,
        output,
        groups: [1, 1, 1],
        node: String::new(),
    }
}

#[test]
fn pack_reuses_dead_temporaries_but_never_in_place() {
    // x -> a -> b -> c -> out: a is dead once b is written, so c takes
    // a's buffer; b never shares with its own input a.
    let values = vec![
        v(8, Role::Input),
        v(8, Role::Temp),
        v(8, Role::Temp),
        v(8, Role::Temp),
        v(8, Role::Temp),
    ];
    let launches = vec![l(vec![0], 1), l(vec![1], 2), l(vec![2], 3), l(vec![3], 4)];
    let pinned = HashSet::from([4]);
    let (of, words) = pack(&values, &launches, &pinned);
    assert_ne!(of[1], of[2]);
    assert_ne!(of[2], of[3]);
    assert_eq!(of[3], of[1]);
    assert!(of[4] != of[3] && of[4] != of[2] && of[4] != of[0]);
    assert_eq!(words.len(), 4);
}
