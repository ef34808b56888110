use super::*;

#[test]
fn defaults_are_valid_and_round_trip() {
    let mut c = AggregatorConfig::default();
    assert!(c.dominance_risks().is_empty(), "{:?}", c.dominance_risks());
    // Without a stake registry nobody could take part: a clear error.
    let e = c.server_config().unwrap_err().to_string();
    assert!(e.contains("no stake registry"), "{e}");
    c.stakes = Some("stakes.txt".into());
    c.server_config().unwrap();
    let text = toml::to_string(&c).unwrap();
    let back: AggregatorConfig = toml::from_str(&text).unwrap();
    assert_eq!(back, c);
}

/// Each way to let one participant dominate is refused with its
/// reason, and only the explicit flag lets it start.
#[test]
fn dominating_configs_are_refused_unless_explicitly_unsafe() {
    let base = AggregatorConfig {
        stakes: Some("stakes.txt".into()),
        ..AggregatorConfig::default()
    };
    type Change = fn(&mut AggregatorConfig);
    let cases: [(&str, Change); 5] = [
        ("max_share", |c| c.weights.max_share = 0.6),
        ("min_devices", |c| c.rounds.min_devices = 1),
        ("plain mean", |c| {
            c.strategy.combine = CombineSpec::Mean;
            c.strategy.clip = None;
        }),
        ("10^12 samples", |c| {
            c.weights.max_share = 1.0;
            c.weights.samples = Transform::Linear;
        }),
        // Capped claims on an epoch plan: a coalition of liars buys
        // the cap each.
        ("claimed sample count", |c| {
            c.weights.samples = Transform::Capped { cap: 1000.0 };
        }),
    ];
    for (needle, change) in cases {
        let mut c = base.clone();
        change(&mut c);
        let e = c.server_config().unwrap_err().to_string();
        assert!(
            e.contains(needle) && e.contains("i_know_this_is_unsafe"),
            "{e}"
        );
        c.i_know_this_is_unsafe = true;
        c.server_config().unwrap();
    }
    let mut open = base.clone();
    open.stakes = None;
    open.weights.allow_unknown = true;
    let e = open.server_config().unwrap_err().to_string();
    assert!(e.contains("constant"), "{e}");
    open.weights.stake = Transform::Constant;
    open.server_config().unwrap();
    // A plan that fixes the work bounds every claim: counting claims
    // is then no risk.
    let mut fixed_work = base.clone();
    fixed_work.weights.samples = Transform::Linear;
    fixed_work.plan.local_steps = 20;
    assert!(fixed_work.dominance_risks().is_empty());
    fixed_work.server_config().unwrap();
    // DP-FedAvg clips every update and weighs each the same: neither
    // the missing norm bound nor counted claims is a risk.
    let mut dp = base.clone();
    dp.strategy.combine = CombineSpec::Mean;
    dp.strategy.clip = None;
    dp.strategy.dp = Some(crate::privacy::DpSpec {
        population: 1000,
        clip: crate::privacy::DpClip::Fixed { bound: 1.0 },
        ..Default::default()
    });
    dp.weights.samples = Transform::Linear;
    assert!(
        dp.dominance_risks().is_empty(),
        "{:?}",
        dp.dominance_risks()
    );
    dp.server_config().unwrap();
}

/// `[strategy.secagg]` parses, states its threat model in checked
/// numbers, and refuses what needs plaintext updates, naming it.
#[test]
fn secagg_refuses_what_needs_plaintext_updates() {
    let text = "stakes = \"stakes.txt\"\n[rounds]\ndevices_per_round = 100\nover_selection = 1.0\n\
                [strategy]\ncombine = { kind = \"mean\" }\n\
                [strategy.secagg]\ndegree = 40\nthreshold = 12\ncolluding_devices = 5\n";
    let base = toml::from_str::<AggregatorConfig>(text).unwrap_or_else(|e| panic!("{e}"));
    let mut base = base;
    base.strategy.clip = None;
    base.server_config().unwrap_or_else(|e| panic!("{e}"));
    let spec = base.strategy.secagg.clone().unwrap();
    assert_eq!(
        (spec.degree, spec.threshold, spec.colluding_devices),
        (40, 12, 5)
    );
    type Change = fn(&mut AggregatorConfig);
    let cases: [(Change, &str); 9] = [
        (
            |c| c.strategy.combine = CombineSpec::TrimmedMean { trim: 0.2 },
            "robust combiner",
        ),
        (
            |c| c.scoring.validation = Some("mnist".into()),
            "scoring.validation",
        ),
        (|c| c.update_norm_max = Some(5.0), "update_norm_max"),
        (
            |c| c.strategy.clip = Some(ClipSpec::Fixed { bound: 1.0 }),
            "strategy.clip",
        ),
        (|c| c.plan.codec = "topk:0.1".into(), "codec \"topk:0.1\""),
        (
            |c| c.strategy.buffered = Some(Default::default()),
            "FedBuff",
        ),
        (
            |c| c.strategy.secagg.as_mut().unwrap().threshold = 5,
            "must exceed colluding_devices",
        ),
        (
            |c| c.strategy.secagg.as_mut().unwrap().survivors_min = 3,
            "survivors_min",
        ),
        (
            |c| c.strategy.secagg.as_mut().unwrap().bits = 8,
            "raise bits",
        ),
    ];
    for (change, expect) in cases {
        let mut c = base.clone();
        change(&mut c);
        let e = c.server_config().unwrap_err().to_string();
        assert!(e.contains(expect), "{expect}: {e}");
    }
}

#[test]
fn bad_configs_are_clear_errors() {
    let typo = toml::from_str::<AggregatorConfig>("[rounds]\nround = 3\n");
    assert!(
        typo.unwrap_err()
            .to_string()
            .contains("unknown field `round`")
    );
    let mut c = AggregatorConfig::default();
    c.rounds.min_devices = 50;
    let e = c.server_config().unwrap_err().to_string();
    assert!(e.contains("min_devices"), "{e}");
    let mut c = AggregatorConfig::default();
    c.plan.optimizer = "lion".into();
    assert!(c.server_config().unwrap_err().to_string().contains("lion"));
    let mut c = AggregatorConfig::default();
    c.plan.codec = "zip".into();
    assert!(c.server_config().unwrap_err().to_string().contains("zip"));
    for rate in [0.0, -1.0, f64::NAN] {
        let mut c = AggregatorConfig::default();
        c.server.handshakes_per_sec = rate;
        let e = c.server_config().unwrap_err().to_string();
        assert!(e.contains("handshakes_per_sec"), "{e}");
    }
    let bad_db = toml::from_str::<AggregatorConfig>("database = \"mysql://h/db\"\n");
    let e = bad_db.unwrap_err().to_string();
    assert!(e.contains("database URL `mysql://h/db`"), "{e}");
    let pg: AggregatorConfig = toml::from_str("database = \"postgres://u@h:5/db\"\n").unwrap();
    // A server off this machine gets verified TLS unless the URL says.
    assert_eq!(
        pg.database,
        Database::Postgres("postgres://u@h:5/db?sslmode=verify-full".into())
    );
}

/// `[scoring]` reaches the coordinator; bad values are named.
#[test]
fn scoring_is_configured_from_the_file() {
    let c: AggregatorConfig = toml::from_str(
        "stakes = \"stakes.txt\"\n[scoring]\nvalidation = \"mnist\"\nmethod = \"leave-one-out\"\nreward_pool = 7\n",
    )
    .unwrap();
    assert_eq!(c.scoring.validation.as_deref(), Some("mnist"));
    let s = c.server_config().unwrap();
    assert_eq!(
        s.coordinator.scoring.method,
        crate::scoring::ScoreMethod::LeaveOneOut
    );
    assert_eq!(s.coordinator.scoring.reward_pool, 7);
    let bad = toml::from_str::<AggregatorConfig>("[scoring]\nmethod = \"vibes\"\n");
    assert!(bad.unwrap_err().to_string().contains("vibes"));
    for (edit, needle) in [
        (
            (|c: &mut AggregatorConfig| c.scoring.validation_samples = 0) as fn(&mut _),
            "validation_samples",
        ),
        (|c| c.scoring.copy_cosine_min = 1.5, "copy_cosine_min"),
        (|c| c.scoring.rating_alpha = 0.0, "rating_alpha"),
        (|c| c.scoring.noise_sigmas = -1.0, "noise_sigmas"),
        (
            |c| c.scoring.free_rider_norm_ratio = 1.0,
            "free_rider_norm_ratio",
        ),
    ] {
        let mut c = AggregatorConfig {
            stakes: Some("stakes.txt".into()),
            ..AggregatorConfig::default()
        };
        edit(&mut c);
        let e = c.server_config().unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
    }
}

/// `[tree]`: a root names its leaves' keys and needs no stake registry;
/// a leaf names its parent and runs the parent's rounds; bad keys, pins
/// and what a tree cannot do are clear errors.
#[test]
fn tree_roles_are_configured_from_the_file() {
    let key = hex::encode(
        fedge_proto::sign::SigningKey::from_bytes(&[3; 32])
            .verifying_key()
            .to_bytes(),
    );
    let root: AggregatorConfig = toml::from_str(&format!(
        "[rounds]\ndevices_per_round = 1\nmin_devices = 1\n\
         [tree.leaves]\nkeys = [\"{key}\"]\ndevice_weight_max = 600.0\n"
    ))
    .unwrap();
    let mut root = root;
    root.i_know_this_is_unsafe = true;
    let s = root.server_config().unwrap();
    let leaves = s.coordinator.tree.leaves.as_ref().unwrap();
    assert_eq!(leaves.keys.len(), 1);
    assert_eq!(leaves.devices_max, 10_000);
    assert!(!s.coordinator.tree.leaf);
    let mut bad = root.clone();
    bad.tree.leaves.as_mut().unwrap().keys = vec!["zz".into()];
    assert!(
        bad.server_config()
            .unwrap_err()
            .to_string()
            .contains("tree.leaves.keys")
    );
    let mut too_many = root.clone();
    too_many.rounds.devices_per_round = 2;
    too_many.rounds.min_devices = 2;
    let e = too_many.server_config().unwrap_err().to_string();
    assert!(e.contains("only 1 leaves are allowed"), "{e}");

    let pin = "ab".repeat(32);
    let leaf: AggregatorConfig = toml::from_str(&format!(
        "stakes = \"stakes.txt\"\n[tree.parent]\naddress = \"127.0.0.1:4433\"\npin = \"{pin}\"\n"
    ))
    .unwrap();
    let s = leaf.server_config().unwrap();
    assert!(s.coordinator.tree.leaf);
    assert_eq!(s.coordinator.rounds, 0, "a leaf runs its parent's rounds");
    let link = leaf.parent_link().unwrap().unwrap();
    assert_eq!(link.pin, [0xab; 32]);
    assert_eq!(link.upload_margin, Duration::from_secs(2));
    let mut bad_pin = leaf.clone();
    bad_pin.tree.parent.as_mut().unwrap().pin = "abcd".into();
    assert!(
        bad_pin
            .parent_link()
            .unwrap_err()
            .to_string()
            .contains("64 hex digits")
    );
    let mut adam = leaf.clone();
    adam.strategy.server_opt = crate::strategy::ServerOpt::Adam {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.99,
        tau: 1e-3,
    };
    let e = adam.server_config().unwrap_err().to_string();
    assert!(e.contains("server optimizer"), "{e}");
    let mut fedbuff = leaf.clone();
    fedbuff.strategy.buffered = Some(Default::default());
    let e = fedbuff.server_config().unwrap_err().to_string();
    assert!(e.contains("FedBuff"), "{e}");
}
