//! A leaf aggregator killed (SIGKILL) in the middle of a round and
//! restarted from its state directory, real processes over loopback QUIC:
//! a root, two leaves and four `fedge-device` processes sending known
//! updates. The leaf is killed once after acknowledging two of its three
//! devices' updates (it puts them back when the root offers the round
//! again), and once after the root accepted its partial while the root
//! still waits for the other leaf (the root paces it away: one partial a
//! leaf a round). The tree keeps publishing, every device contributes to
//! both rounds, the root holds one partial of that leaf for the round,
//! whatever it refused it refused with a typed code, and the published
//! models are the hand-computed means: nothing acknowledged is lost and
//! nothing is counted twice.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use crate::procs;
use procs::{
    CLOSED_FLEET, Proc, bin, device_succeeded, listening, spawn_logged, start_device, stderr_lines,
    wait_exit, wait_for,
};

use fedge_aggregator::store::Store;
use fedge_proto::{Limits, ModelBlob, ParamLayout, Params, RejectCode, TensorSpec};

const ROUNDS: u64 = 2;

/// `serve` with `config` on `state` (listening on `listen`), its log
/// lines at info.
fn serve(listen: &str, config: &Path, state: &Path, model: &Path) -> Proc {
    spawn_logged(
        Command::new(bin("fedge-aggregator"))
            .args(["serve", "--listen", listen])
            .arg("--config")
            .arg(config)
            .arg("--state-dir")
            .arg(state)
            .arg("--model")
            .arg(model),
    )
}

fn write(path: PathBuf, text: String) -> PathBuf {
    std::fs::write(&path, text).unwrap();
    path
}

fn leaf_key(state: &Path) -> String {
    let out = Command::new(bin("fedge-aggregator"))
        .arg("leaf-key")
        .arg("--state-dir")
        .arg(state)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn a_leaf_killed_mid_round_loses_nothing_and_counts_once() {
    assert!(
        bin("fedge-device").exists(),
        "build the workspace first (cargo test --workspace)"
    );
    let dir = tempfile::tempdir().unwrap();
    let at = |name: &str| dir.path().join(name);
    let model = at("m.fedge");
    let layout = Arc::new(ParamLayout::new(vec![TensorSpec::new("w", &[6])]).unwrap());
    let initial = ModelBlob {
        onnx_graph: Default::default(),
        params: Params::new(layout, vec![0.5; 6]).unwrap(),
    };
    std::fs::write(&model, initial.encode()).unwrap();

    // The root waits for both leaves' partials in each of two rounds.
    let (l_state, m_state) = (at("leaf-l"), at("leaf-m"));
    let keys = [leaf_key(&l_state), leaf_key(&m_state)];
    let root_toml = write(
        at("root.toml"),
        format!(
            "{CLOSED_FLEET}
[rounds]
rounds = {ROUNDS}
devices_per_round = 2
min_devices = 2
over_selection = 1.0
round_deadline_ms = 180000
selection_window_ms = 0
retry_window_ms = [100, 300]
[tree.leaves]
keys = [\"{}\", \"{}\"]
device_weight_max = 10.0
devices_max = 10
",
            keys[0], keys[1]
        ),
    );
    let mut root = serve("127.0.0.1:0", &root_toml, &at("root"), &model);
    let (root_addr, root_pin) = listening(&mut root);
    let root_log = stderr_lines(&mut root);
    // Leaf L: three devices a round; leaf M: one.
    let leaf_toml = |name: &str, devices: usize| {
        write(
            at(&format!("{name}.toml")),
            format!(
                "{CLOSED_FLEET}
[rounds]
devices_per_round = {devices}
min_devices = {devices}
over_selection = 1.0
selection_window_ms = 500
retry_window_ms = [100, 300]
[tree.parent]
address = \"{root_addr}\"
pin = \"{root_pin}\"
"
            ),
        )
    };
    let (l_toml, m_toml) = (leaf_toml("leaf-l", 3), leaf_toml("leaf-m", 1));
    let mut leaf_l = serve("127.0.0.1:0", &l_toml, &l_state, &model);
    let (l_addr, l_pin) = listening(&mut leaf_l);
    let _l_first_log = stderr_lines(&mut leaf_l);
    let mut leaf_m = serve("127.0.0.1:0", &m_toml, &m_state, &model);
    let (m_addr, m_pin) = listening(&mut leaf_m);
    let _m_log = stderr_lines(&mut leaf_m);

    // Round 1: a and b's updates acknowledged at L, then L is killed.
    let (mut a, a_log) = start_device(&l_addr, &l_pin, &at("a"), "1.0");
    let (mut b, b_log) = start_device(&l_addr, &l_pin, &at("b"), "2.0");
    wait_for(&a_log, "update accepted", Duration::from_secs(60));
    wait_for(&b_log, "update accepted", Duration::from_secs(60));
    leaf_l.0.kill().unwrap();
    leaf_l.0.wait().unwrap();

    // Restarted from its state directory on the same address: the root
    // offers it round 1 again, it puts a and b back, c completes it.
    let mut leaf_l = serve(&l_addr, &l_toml, &l_state, &model);
    assert_eq!(listening(&mut leaf_l).0, l_addr);
    let l_log = stderr_lines(&mut leaf_l);
    let (mut c, _c_log) = start_device(&l_addr, &l_pin, &at("c"), "3.0");
    let lines = wait_for(
        &l_log,
        "partial aggregate accepted by the parent",
        Duration::from_secs(90),
    );
    // Its three devices' updates: a and b put back, c's new.
    assert!(
        lines
            .iter()
            .any(|l| l.contains("partial aggregate forwarded") && l.contains("accepted=3")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .filter(|l| l.contains("update accepted"))
            .count()
            == 1,
        "only c's update arrived after the restart: {lines:#?}"
    );

    // Killed again, its partial acknowledged, the root's round still
    // waiting for M (whose device has not come yet).
    leaf_l.0.kill().unwrap();
    leaf_l.0.wait().unwrap();
    let mut leaf_l = serve(&l_addr, &l_toml, &l_state, &model);
    listening(&mut leaf_l);
    let _l_log = stderr_lines(&mut leaf_l);
    let (mut d, _d_log) = start_device(&m_addr, &m_pin, &at("d"), "10.0");

    for (name, p) in [("a", &mut a), ("b", &mut b), ("c", &mut c), ("d", &mut d)] {
        let out = device_succeeded(name, p, Duration::from_secs(120));
        assert!(
            out.contains(&format!("rounds_contributed={ROUNDS} ")),
            "device {name}: {out}"
        );
    }
    let root_status = wait_exit(&mut root, Duration::from_secs(60));
    assert!(root_status.success(), "root exited with {root_status}");
    for (name, l) in [("L", &mut leaf_l), ("M", &mut leaf_m)] {
        let s = wait_exit(l, Duration::from_secs(60));
        assert!(s.success(), "leaf {name} exited with {s}");
    }
    let root_lines: Vec<String> = root_log.try_iter().collect();

    // Each round: L's partial (1 + 2 + 3) / 3 at weight 3 and M's 10 at
    // weight 1, so + (3 x 2 + 10) / 4 = 4 a round. Had L's devices counted
    // twice in round 1 (a second partial, or a and b again), it would not.
    for name in ["a", "b", "c", "d"] {
        let bytes = std::fs::read(at(name).join("model.fedge")).unwrap();
        let m = ModelBlob::decode(&bytes, &Limits::default()).unwrap();
        assert_eq!(m.params.values, vec![8.5; 6], "device {name}'s final model");
    }

    // The root's records: one accepted partial a leaf a round; anything
    // refused was refused with a typed code.
    let records = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = Store::open(&at("root")).await.unwrap();
        let mut all = Vec::new();
        for round in 1..=ROUNDS {
            all.push(store.contributions(round).await.unwrap());
        }
        store.close().await;
        all
    });
    let codes: Vec<&str> = RejectCode::ALL.iter().map(|c| c.as_str()).collect();
    for (i, round) in records.iter().enumerate() {
        for key in &keys {
            let accepted = round
                .iter()
                .filter(|c| c.accepted && &c.device == key)
                .count();
            assert_eq!(accepted, 1, "round {}: {round:?}", i + 1);
        }
        for c in round.iter().filter(|c| !c.accepted) {
            let reason = c.reason.as_deref().unwrap_or_default();
            assert!(
                codes.iter().any(|code| reason.starts_with(code)),
                "round {}: an untyped refusal: {c:?}",
                i + 1
            );
        }
    }
    assert!(
        !root_lines.iter().any(|l| l.contains("panicked")),
        "{root_lines:#?}"
    );
}
