//! The convolution ops and their packers against their definitions.

use super::*;

fn naive_forward(g: &Geometry, co: usize, x: &[f32], w: &[f32], bias: &[f32]) -> Vec<f32> {
    let mut y = vec![0.0; g.n * co * g.ho * g.wo];
    for b in 0..g.n {
        for o in 0..co {
            for oy in 0..g.ho {
                for ox in 0..g.wo {
                    let mut s = bias[o] as f64;
                    for c in 0..g.c {
                        for i in 0..g.kh {
                            for j in 0..g.kw {
                                let yy = (oy * g.sh + i) as isize - g.pt as isize;
                                let xx = (ox * g.sw + j) as isize - g.pl as isize;
                                if yy < 0 || xx < 0 || yy as usize >= g.h || xx as usize >= g.w {
                                    continue;
                                }
                                let xv = x[((b * g.c + c) * g.h + yy as usize) * g.w + xx as usize];
                                let wv = w[((o * g.c + c) * g.kh + i) * g.kw + j];
                                s += (xv * wv) as f64;
                            }
                        }
                    }
                    y[((b * co + o) * g.ho + oy) * g.wo + ox] = s as f32;
                }
            }
        }
    }
    y
}

fn geometries() -> Vec<(Geometry, usize)> {
    let mut v = Vec::new();
    for (n, c, h, w, k, s, p, co) in [
        (3, 2, 6, 7, 3, 1, 1, 5),
        (2, 3, 9, 8, 5, 1, 2, 17),
        (4, 1, 7, 5, 3, 2, 0, 33),
        (2, 2, 6, 6, 3, 2, 0, 4),
        (2, 4, 5, 5, 1, 1, 0, 3),
        (5, 3, 8, 6, 2, 2, 1, 7),
        // A kernel wider than the image row; a single output pixel.
        (2, 2, 4, 3, 5, 1, 2, 3),
        (1, 1, 2, 2, 3, 2, 1, 2),
    ] {
        v.push((Geometry::square((n, c, h, w), (k, s, p)), co));
    }
    v
}

fn data(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| (((i * 7 + seed * 13) % 23) as f32 - 11.0) / 8.0)
        .collect()
}

fn close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
            "{what}[{i}]: {a} vs {b}"
        );
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.try_as_plain_ram()
        .unwrap()
        .as_slice::<f32>()
        .unwrap()
        .to_vec()
}

/// Both loops of `pack_strided` (a transpose, rows contiguous along
/// `k`, and the general one) against the definition, at an offset
/// `k0`, over more than one block of records, with a partial last
/// panel, for a width `by_width!` names and one it does not.
#[test]
fn pack_strided_matches_the_definition() {
    let (mn, k, k0) = (37, 150, 5);
    for r in [32, 7] {
        for (mn_stride, k_stride) in [(k + 3, 1), (1, mn + 2), (2, 2 * mn + 1)] {
            let src = data((mn - 1) * mn_stride + (k - 1) * k_stride + 1, 9);
            let panel_len = (k0 + k) * r;
            let mut dst = vec![f32::NAN; mn.div_ceil(r) * panel_len];
            pack_strided(
                &mut dst,
                (panel_len, r),
                &src,
                (mn, k, k0),
                (mn_stride, k_stride),
            );
            for p in 0..mn.div_ceil(r) {
                for kk in 0..k {
                    for rr in 0..r {
                        let got = dst[p * panel_len + (k0 + kk) * r + rr];
                        let row = p * r + rr;
                        let want = if row < mn {
                            src[row * mn_stride + kk * k_stride]
                        } else {
                            0.0
                        };
                        assert_eq!(
                            got, want,
                            "r {r} strides ({mn_stride}, {k_stride}) [{p}, {kk}, {rr}]"
                        );
                    }
                }
            }
        }
    }
}

/// More patch rows than one forward product packs (FORWARD_K): the
/// forward, and the input gradient (the forward on `gy` with `co`
/// channels) against a direct sum over the windows.
#[test]
fn products_over_slices_of_patch_rows_add_up() {
    // 41 * 25 = 1,025 rows forward: slices of 342, 342 and 341; 40 *
    // 25 = 1,000 for the input gradient: two of 500.
    let g = Geometry::square((2, 41, 6, 7), (5, 1, 2));
    let co = 40;
    let x = data(g.n * g.c * g.h * g.w, 7);
    let w = data(co * g.c * g.kh * g.kw, 8);
    let bias = data(co, 9);
    let bt = Tensor::from_shape(&[co], &bias).unwrap();
    let y = forward(&g, co, &x, &w, Some(&bt)).unwrap();
    close(
        &values(&y),
        &naive_forward(&g, co, &x, &w, &bias),
        "forward",
    );
    let gy = data(g.n * co * g.ho * g.wo, 10);
    let mut want = vec![0.0f32; x.len()];
    for b in 0..g.n {
        for o in 0..co {
            for oy in 0..g.ho {
                for ox in 0..g.wo {
                    let v = gy[((b * co + o) * g.ho + oy) * g.wo + ox];
                    for c in 0..g.c {
                        for i in 0..g.kh {
                            for j in 0..g.kw {
                                let yy = (oy + i) as isize - g.pt as isize;
                                let xx = (ox + j) as isize - g.pl as isize;
                                if yy < 0 || xx < 0 || yy as usize >= g.h || xx as usize >= g.w {
                                    continue;
                                }
                                want[((b * g.c + c) * g.h + yy as usize) * g.w + xx as usize] +=
                                    v * w[((o * g.c + c) * g.kh + i) * g.kw + j];
                            }
                        }
                    }
                }
            }
        }
    }
    let dx = grad_input(&g, co, &gy, &w).unwrap();
    close(&values(&dx), &want, "dX");
}

#[test]
fn forward_matches_the_definition() {
    for (g, co) in geometries() {
        let x = data(g.n * g.c * g.h * g.w, 1);
        let w = data(co * g.c * g.kh * g.kw, 2);
        let bias = data(co, 3);
        let bt = Tensor::from_shape(&[co], &bias).unwrap();
        let y = forward(&g, co, &x, &w, Some(&bt)).unwrap();
        close(
            &values(&y),
            &naive_forward(&g, co, &x, &w, &bias),
            &format!("{g:?}"),
        );
        let y = forward(&g, co, &x, &w, None).unwrap();
        close(
            &values(&y),
            &naive_forward(&g, co, &x, &w, &vec![0.0; co]),
            "no bias",
        );
    }
}

/// The gradients are the adjoints of the forward product:
/// `<dW, V> = <gy, conv(x, V)>` and `<dX, U> = <gy, conv(U, w)>`,
/// checked against the naive convolution.
#[test]
fn gradients_are_the_adjoints() {
    for (g, co) in geometries() {
        let (nx, nw) = (g.n * g.c * g.h * g.w, co * g.c * g.kh * g.kw);
        let x = data(nx, 4);
        let w = data(nw, 5);
        let gy = data(g.n * co * g.ho * g.wo, 6);
        let zero = vec![0.0; co];
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(a, b)| (a * b) as f64).sum::<f64>();
        for images in [1, 2, g.n] {
            let dw = values(&grad_weight(&g, co, &x, &gy, images).unwrap());
            // <dW, w> = <gy, conv(x, w)> for any w: a basis check per entry.
            let mut want = vec![0.0f32; nw];
            for (e, slot) in want.iter_mut().enumerate() {
                let mut basis = vec![0.0; nw];
                basis[e] = 1.0;
                *slot = dot(&gy, &naive_forward(&g, co, &x, &basis, &zero)) as f32;
            }
            close(&dw, &want, &format!("dW {g:?} images {images}"));
        }
        let dx = values(&grad_input(&g, co, &gy, &w).unwrap());
        let mut want = vec![0.0f32; nx];
        for (e, slot) in want.iter_mut().enumerate() {
            let mut basis = vec![0.0; nx];
            basis[e] = 1.0;
            *slot = dot(&gy, &naive_forward(&g, co, &basis, &w, &zero)) as f32;
        }
        close(&dx, &want, &format!("dX {g:?}"));
    }
}
