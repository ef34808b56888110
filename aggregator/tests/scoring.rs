//! Contribution scoring on a simulated fleet (no sockets, virtual time):
//! helpful updates score positive and are paid, a noise sender scores
//! negative, a free-rider and a copycat are flagged, and nobody flagged or
//! negative is paid; the scores are what a verifier recomputes from the
//! published model, the updates and the validation set; everything is the
//! same for the same seed.

use crate::sim;

use std::time::Duration;

use fedge_aggregator::coordinator::{CoordinatorConfig, Event, Settlement};
use fedge_aggregator::scoring::{self, Evaluator, ScoreMethod, ScoringConfig};
use fedge_aggregator::weighting::WeightPolicy;
use rand::{Rng, SeedableRng};
use sim::{DeviceSpec, NetConfig, Sim};

const DIM: usize = 64;
const SEEDS: [u64; 3] = [1, 7, 42];

/// The loss of `w` on example `k` is `|w - target - e_k|^2`: a quadratic
/// around `target`, each example slightly off it.
struct Quadratic {
    target: Vec<f32>,
    n: usize,
}

impl Evaluator for Quadratic {
    fn len(&self) -> usize {
        self.n
    }
    fn loss(&mut self, params: &[f32], indices: &[usize]) -> Result<f64, String> {
        let mut s = 0.0;
        for &k in indices {
            if k >= self.n {
                return Err(format!("index {k} out of range"));
            }
            let off = 0.001 * ((k % 11) as f64 - 5.0);
            s += params
                .iter()
                .zip(&self.target)
                .map(|(&p, &t)| (f64::from(p) - f64::from(t) - off).powi(2))
                .sum::<f64>();
        }
        Ok(s / indices.len() as f64)
    }
}

/// The initial model of `sim::model`, and a target 1.0 away in every
/// coordinate: helpful updates point at it.
fn target() -> Vec<f32> {
    sim::model(DIM)
        .params
        .values
        .iter()
        .map(|v| v + 1.0)
        .collect()
}

/// Devices 0-3 honest (toward the target, each with its own noise),
/// 4 a noise sender, 5 a free-rider, 6 a copycat of device 0's update
/// (slower, so its copy arrives after the original).
fn fleet(seed: u64) -> Vec<DeviceSpec> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut noisy = |scale: f32, base: f32| -> Vec<f32> {
        (0..DIM)
            .map(|_| base + scale * (rng.random::<f32>() - 0.5))
            .collect()
    };
    let honest: Vec<Vec<f32>> = (0..4).map(|_| noisy(0.6, 0.5)).collect();
    let noise = noisy(20.0, 0.0);
    let spec = |v: Vec<f32>, train_ms: u64| DeviceSpec {
        vector: Some(v),
        wobble: true,
        train_time: Duration::from_millis(train_ms),
        ..DeviceSpec::new(0.0, 10)
    };
    let mut specs: Vec<DeviceSpec> = honest.iter().map(|v| spec(v.clone(), 300)).collect();
    specs.push(spec(noise, 300));
    specs.push(spec(vec![1e-7; DIM], 300));
    specs.push(spec(honest[0].clone(), 3000));
    specs
}

fn cfg() -> CoordinatorConfig {
    CoordinatorConfig {
        devices_per_round: 7,
        over_selection: 1.0,
        min_devices: 7,
        rounds: 2,
        round_deadline: Duration::from_secs(30),
        retry_window: (Duration::from_millis(300), Duration::from_millis(900)),
        chunk_bytes: 128,
        weights: WeightPolicy {
            max_share: 0.3,
            ..WeightPolicy::default()
        },
        scoring: ScoringConfig {
            validation_samples: 40,
            // The simulated devices' training is virtual: a fixed sample.
            cost_budget: 0.0,
            reward_pool: 1000,
            // A quadratic loss has no classes.
            method: ScoreMethod::Direct,
            ..ScoringConfig::default()
        },
        ..CoordinatorConfig::default()
    }
}

/// The validation loss every test scores on.
fn quadratic() -> Quadratic {
    Quadratic {
        target: target(),
        n: 200,
    }
}

/// A simulated fleet of `specs` whose coordinator scores on [`quadratic`].
fn scored(seed: u64, cfg: CoordinatorConfig, specs: Vec<DeviceSpec>) -> Sim {
    let mut sim = Sim::new(seed, cfg, NetConfig::default(), specs);
    sim.coord.set_evaluator(Box::new(quadratic()));
    sim
}

fn run(seed: u64) -> Sim {
    let mut sim = scored(seed, cfg(), fleet(seed));
    sim.run_to_end(Duration::from_secs(300));
    sim
}

/// A held penalty as its ledger record carries it, its evidence checked.
fn checked_evidence(
    p: &fedge_aggregator::coordinator::Penalty,
) -> fedge_proto::ledger::LedgerPenalty {
    let lp = fedge_proto::ledger::LedgerPenalty {
        device: fedge_aggregator::ledger::device_bytes(&p.device).unwrap(),
        round_id: p.round_id,
        manifest_hash: p.manifest_hash,
        payload_hash: p.payload_hash,
        kind: p.kind,
        slashed: p.slashed,
    };
    let limits = fedge_proto::Limits::default();
    fedge_aggregator::ledger::check_evidence(&lp, &p.payload, Some(DIM), &limits).unwrap();
    lp
}

/// The updates of record `r`'s entries, decoded from what the simulated
/// store kept of them.
fn kept_deltas(sim: &Sim, r: &fedge_proto::ledger::LedgerRecord) -> Vec<Vec<f32>> {
    r.entries
        .iter()
        .map(|e| {
            let u = sim
                .kept
                .iter()
                .find(|u| u.payload_hash == e.payload_hash && u.round_id == r.round_id)
                .unwrap();
            fedge_proto::update::decode_any(&u.payload, DIM, &Default::default()).unwrap()
        })
        .collect()
}

fn settlements(sim: &Sim) -> Vec<Settlement> {
    sim.events
        .iter()
        .filter_map(|e| match e {
            Event::RoundSettled(s) => Some((**s).clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn helpful_updates_are_paid_and_adversaries_are_not() {
    for seed in SEEDS {
        let sim = run(seed);
        let settled = settlements(&sim);
        assert_eq!(settled.len(), 2, "seed {seed}: both rounds settled");
        let id = |i: usize| sim.device_id(i);
        for s in &settled {
            assert_eq!(s.entries.len(), 7, "seed {seed} round {}", s.round_id);
            assert_eq!(s.error, None, "seed {seed}");
            assert_eq!(s.validation_samples, 40);
            let e = |i: usize| {
                s.entries
                    .iter()
                    .find(|e| e.device == id(i))
                    .unwrap_or_else(|| panic!("seed {seed}: device {i} settled"))
            };
            for i in 0..4 {
                let h = e(i);
                assert!(h.score.unwrap() > 0.0, "seed {seed} honest {i}: {h:?}");
                assert!(
                    h.copy_of.is_none() && !h.free_rider,
                    "seed {seed} honest {i}"
                );
                assert!(h.reward > 0, "seed {seed} honest {i} paid");
                assert!(h.reward <= 300, "seed {seed}: share capped at 30%");
            }
            let noise = e(4);
            assert!(noise.score.unwrap() < 0.0, "seed {seed}: {noise:?}");
            assert!(noise.noise, "seed {seed}: {noise:?}");
            assert!(!e(0).noise && !e(6).noise, "seed {seed}");
            assert_eq!(noise.reward, 0, "seed {seed}");
            let free = e(5);
            assert!(free.free_rider, "seed {seed}: {free:?}");
            assert_eq!(free.reward, 0);
            let copy = e(6);
            assert_eq!(copy.copy_of.as_deref(), Some(id(0).as_str()), "seed {seed}");
            assert_eq!(copy.reward, 0);
            let paid: u64 = s.entries.iter().map(|e| e.reward).sum();
            // Four honest devices, none capped: all but rounding is paid.
            assert!((996..=1000).contains(&paid), "seed {seed}: paid {paid}");
            // Scoring cost: 8 evaluations of 40 examples over 7 x 10 x 3.
            assert_eq!(s.cost.scoring_passes, 8 * 40, "seed {seed}");
            assert_eq!(s.cost.training_passes, 7 * 10 * 3, "seed {seed}");
        }
        assert_eq!(
            settled[1].model_before,
            sim.published()[0].2,
            "seed {seed}: round 2 applied to round 1's model"
        );
    }
}

/// Ratings fed back into weights (`weights.rating_floor`, the operator's
/// choice): once a device has two scored rounds with a rating at or below
/// zero (the noise sender, the free-rider and the copycat, whose flagged
/// rounds count at most 0), its updates weigh a tenth of an honest
/// device's; before that, and for honest devices, weights are untouched.
#[test]
fn ratings_at_or_below_zero_lower_aggregation_weights_when_asked() {
    for seed in SEEDS {
        let mut c = cfg();
        c.rounds = 4;
        c.weights.rating_floor = Some(0.1);
        c.weights.rating_rounds = 2;
        c.weights.max_share = 1.0;
        let mut sim = scored(seed, c, fleet(seed));
        sim.run_to_end(Duration::from_secs(600));
        let settled = settlements(&sim);
        assert_eq!(settled.len(), 4, "seed {seed}");
        for s in &settled {
            let w = |i: usize| {
                let id = sim.device_id(i);
                s.entries.iter().find(|e| e.device == id).unwrap().weight
            };
            let honest = w(0);
            for i in 1..4 {
                assert!((w(i) - honest).abs() < 1e-12, "seed {seed}");
            }
            let factor = if s.round_id > 2 { 0.1 } else { 1.0 };
            for i in 4..7 {
                assert!(
                    (w(i) - factor * honest).abs() < 1e-9,
                    "seed {seed} round {} device {i}: {} against {honest}",
                    s.round_id,
                    w(i)
                );
            }
        }
    }
}

/// What a verifier does: from the model a round started from, the
/// updates and the validation set, recompute each score.
#[test]
fn scores_are_recomputable_and_deterministic() {
    let sim = run(7);
    let settled = settlements(&sim);
    let again = settlements(&run(7));
    assert_eq!(settled, again, "same seed, same settlements");
    let s = &settled[0];
    let base = sim::model(DIM).params.values;
    assert_eq!(s.model_before, sim::model(DIM).version());
    let seed = scoring::scoring_seed(7, s.round_id, &s.model_before);
    assert_eq!(seed, s.scoring_seed);
    let idx = scoring::validation_indices(&seed, 200, 40);
    let mut eval = quadratic();
    let base_loss = eval.loss(&base, &idx).unwrap();
    assert_eq!(s.base_loss, Some(base_loss));
    let specs = fleet(7);
    let step = scoring::applied_step(s.server_lr, s.entries.len());
    for (i, spec) in specs.iter().enumerate() {
        let e = s
            .entries
            .iter()
            .find(|e| e.device == sim.device_id(i))
            .unwrap();
        // What the device sent: its vector, wobbled for the round.
        let v: Vec<f32> = spec
            .vector
            .as_ref()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(j, x)| x * sim::wobble(s.round_id, j))
            .collect();
        let moved: Vec<f32> = base
            .iter()
            .zip(&v)
            .map(|(&b, &d)| (f64::from(b) + step * f64::from(d)) as f32)
            .collect();
        let expected = base_loss - eval.loss(&moved, &idx).unwrap();
        assert_eq!(e.score, Some(expected), "device {i}");
    }
}

/// A device whose signed update is over the norm bound is refused, and
/// the next settlement names it as a penalty (with its signed manifest's
/// hash and its payload as evidence).
#[test]
fn an_update_over_the_norm_bound_is_a_recorded_penalty() {
    for seed in SEEDS {
        let mut specs: Vec<DeviceSpec> = fleet(seed).into_iter().take(4).collect();
        // Faster than the others: refused before the round fills.
        specs.push(DeviceSpec {
            vector: Some(vec![50.0; DIM]),
            train_time: Duration::from_millis(100),
            ..DeviceSpec::new(0.0, 10)
        });
        let cfg = CoordinatorConfig {
            devices_per_round: 4,
            over_selection: 1.25,
            min_devices: 4,
            rounds: 1,
            update_norm_max: Some(100.0),
            ..cfg()
        };
        let mut sim = scored(seed, cfg, specs);
        sim.run_to_end(Duration::from_secs(300));
        let settled = settlements(&sim);
        assert_eq!(settled.len(), 1, "seed {seed}");
        let p = &settled[0].penalties;
        assert_eq!(p.len(), 1, "seed {seed}: {p:?}");
        assert_eq!(p[0].device, sim.device_id(4));
        assert_eq!(p[0].kind, fedge_proto::ledger::PENALTY_NORM_BOUND);
        assert_ne!(p[0].manifest_hash, [0; 32]);
        assert_eq!(*blake3::hash(&p[0].payload).as_bytes(), p[0].payload_hash);
        assert!(
            settled[0]
                .entries
                .iter()
                .all(|e| e.device != sim.device_id(4))
        );
    }
}

/// A device that signs a second, different update for a task whose update
/// was accepted (a modified binary) is caught: the replay is refused, the
/// next settlement names an equivocation penalty whose evidence (the two
/// signed manifests) anyone can check, and with `slash_fraction` its stake
/// is slashed from then on, so it weighs and earns less in the next round.
#[test]
fn equivocation_is_a_penalty_with_checkable_evidence_and_slashes_stake() {
    use fedge_proto::ledger::PENALTY_EQUIVOCATION;
    for seed in SEEDS {
        let mut specs: Vec<DeviceSpec> = fleet(seed).into_iter().take(5).collect();
        // An honest update of its own (another draw), sent twice over.
        // Faster than the others, so the round is still open when the
        // second update is announced.
        specs[4] = DeviceSpec {
            equivocate: true,
            train_time: Duration::from_millis(100),
            ..fleet(seed + 1000).swap_remove(0)
        };
        let cfg = CoordinatorConfig {
            devices_per_round: 5,
            min_devices: 5,
            rounds: 2,
            scoring: ScoringConfig {
                slash_fraction: 0.5,
                ..cfg().scoring
            },
            weights: WeightPolicy {
                stake: fedge_aggregator::weighting::Transform::Linear,
                max_share: 1.0,
                ..WeightPolicy::default()
            },
            ..cfg()
        };
        let mut sim = scored(seed, cfg, specs);
        let stakes: std::collections::HashMap<String, f64> =
            (0..5).map(|i| (sim.device_id(i), 2.0)).collect();
        sim.coord.set_stakes(Box::new(stakes));
        sim.run_to_end(Duration::from_secs(300));
        let settled = settlements(&sim);
        assert_eq!(settled.len(), 2, "seed {seed}");
        let cheat = sim.device_id(4);
        let entry = |s: &Settlement| s.entries.iter().find(|e| e.device == cheat).cloned();
        // Round 1: its first update counts, at full stake; the second is
        // refused and becomes a penalty.
        let first = entry(&settled[0]).expect("the first update was accepted");
        assert_eq!(first.stake, Some(2.0), "seed {seed}");
        let p: Vec<_> = settled[0]
            .penalties
            .iter()
            .filter(|p| p.kind == PENALTY_EQUIVOCATION)
            .collect();
        assert_eq!(p.len(), 1, "seed {seed}: {:?}", settled[0].penalties);
        assert_eq!(p[0].device, cheat);
        assert_eq!(p[0].slashed, 0.5);
        let lp = checked_evidence(p[0]);
        let limits = fedge_proto::Limits::default();
        // The evidence is bound to this device and this manifest.
        let mut other = lp.clone();
        other.device = fedge_aggregator::ledger::device_bytes(&sim.device_id(0)).unwrap();
        assert!(
            fedge_aggregator::ledger::check_evidence(&other, &p[0].payload, None, &limits).is_err()
        );
        let mut flipped = p[0].payload.to_vec();
        let n = flipped.len();
        flipped[n - 1] ^= 1;
        assert!(fedge_aggregator::ledger::check_evidence(&lp, &flipped, None, &limits).is_err());
        // Nobody honest is penalised.
        assert!(settled[0].penalties.iter().all(|p| p.device == cheat));
        // Round 2: its stake is halved, and its weight with it.
        let second = entry(&settled[1]).expect("accepted again in round 2");
        assert_eq!(second.stake, Some(1.0), "seed {seed}");
        let honest = settled[1]
            .entries
            .iter()
            .find(|e| e.device == sim.device_id(0))
            .unwrap();
        assert!(
            second.weight < honest.weight,
            "seed {seed}: {} vs {}",
            second.weight,
            honest.weight
        );
        assert!(sim.rejections().contains(&fedge_proto::RejectCode::Replay));
    }
}

/// FedBuff: a stale update is scored as it was combined, scaled by its
/// staleness discount; its ledger record says by how much and for which
/// task, so a verifier recomputes its score too (and cannot without it).
#[test]
fn stale_fedbuff_updates_are_recomputable_from_their_records() {
    use fedge_aggregator::ledger;
    use fedge_aggregator::strategy::BufferedSpec;
    use fedge_proto::ledger::LedgerRecord;
    use fedge_proto::{Limits, ModelBlob};
    for seed in SEEDS {
        let mut c = CoordinatorConfig {
            devices_per_round: 4,
            min_devices: 4,
            rounds: 4,
            versions_kept: 4,
            ..cfg()
        };
        c.strategy.buffered = Some(BufferedSpec {
            max_staleness: 3,
            staleness_exponent: 0.5,
            concurrency: Some(7),
        });
        let mut sim = scored(seed, c, fleet(seed));
        sim.run_to_end(Duration::from_secs(600));
        let limits = Limits::default();
        let mut models = vec![sim::model(DIM)];
        let mut published = Vec::new();
        for e in &sim.events {
            if let Event::ModelPublished { round_id, blob, .. } = e {
                let m = ModelBlob::decode(blob, &limits).unwrap();
                published.push((*round_id, m.version()));
                models.push(m);
            }
        }
        let (mut prev, mut stale) = ([0u8; 32], 0);
        let mut history = scoring::replay::History::default();
        let settled = settlements(&sim);
        assert_eq!(settled.len(), 4, "seed {seed}");
        for (i, s) in settled.iter().enumerate() {
            let after = published.iter().find(|p| p.0 == s.round_id).unwrap().1;
            let r = ledger::build_record(i as u64 + 1, prev, s, after).unwrap();
            let r = LedgerRecord::decode(&r.encode()).unwrap();
            prev = r.hash();
            if let Some(st) = &r.staleness {
                st.check_discounts(r.round_id).unwrap();
                stale += st.entries.len();
            }
            let before = &models
                .iter()
                .find(|m| m.version().0 == r.model_before)
                .unwrap()
                .params
                .values;
            let deltas = kept_deltas(&sim, &r);
            let (checked, flags) =
                ledger::recompute_scores(&r, before, &deltas, &mut quadratic(), &mut history)
                    .unwrap();
            assert_eq!(checked, r.entries.len(), "seed {seed} round {}", r.round_id);
            assert_eq!(flags, r.entries.len(), "seed {seed} round {}", r.round_id);
            if r.staleness.is_some() {
                let bare = LedgerRecord {
                    staleness: None,
                    ..r.clone()
                };
                let mut h = Default::default();
                let err =
                    ledger::recompute_scores(&bare, before, &deltas, &mut quadratic(), &mut h);
                assert!(err.is_err(), "seed {seed}: scored undiscounted");
            }
        }
        assert!(stale > 0, "seed {seed}: no stale update to check");
    }
}

/// Equivocation across a restart: the aggregator restarts with a device's
/// accepted update restored from its store, and the device then signs
/// another update for the same task. The signed manifest stored with the
/// update makes the pair evidence, as it is without the restart.
#[test]
fn equivocation_after_a_restart_is_still_a_penalty() {
    use fedge_device::session::Status;
    use fedge_proto::ledger::PENALTY_EQUIVOCATION;
    for seed in SEEDS {
        let mut specs: Vec<DeviceSpec> = fleet(seed).into_iter().take(5).collect();
        specs[4].train_time = Duration::from_millis(100);
        let cfg = CoordinatorConfig {
            devices_per_round: 5,
            min_devices: 5,
            rounds: 1,
            ..cfg()
        };
        let mut sim = scored(seed, cfg, specs);
        let cheat = sim.device_id(4);
        sim.run_until(Duration::from_secs(60), |s| {
            s.accepted().iter().any(|a| a.1 == cheat)
        });
        // What the store holds of the open round, put back after a restart.
        let open = sim.coord.round_id();
        let kept: Vec<_> = sim
            .kept
            .iter()
            .filter(|u| u.round_id == open)
            .cloned()
            .collect();
        assert!(kept.iter().all(|u| !u.signed_manifest.is_empty()));
        sim.restart_aggregator(true);
        for u in kept {
            let now = sim.now;
            sim.coord.restore_update(now, u).unwrap();
        }
        // Back and authenticated, it signs another update for the task.
        sim.run_until(Duration::from_secs(120), |s| {
            s.device_status(4) == Status::Idle
        });
        sim.equivocate_now(4);
        // Held (and made durable) for the next settlement, with its
        // evidence: the restored manifest and the new one.
        let held = |s: &Sim| -> Vec<fedge_aggregator::coordinator::Penalty> {
            s.events
                .iter()
                .filter_map(|e| match e {
                    Event::PenaltyHeld(p) if p.kind == PENALTY_EQUIVOCATION => Some((**p).clone()),
                    _ => None,
                })
                .collect()
        };
        sim.run_until(Duration::from_secs(120), |s| !held(s).is_empty());
        let p = held(&sim);
        assert_eq!(p.len(), 1, "seed {seed}");
        assert_eq!(p[0].device, cheat);
        checked_evidence(&p[0]);
    }
}

/// The flags of a real settlement (a copy, a free-rider, noise) are
/// recomputed from the record's flag rules and acceptance order; a record
/// that moves the copy flag to the original, or clears it, fails naming
/// the device.
#[test]
fn flags_are_recomputed_from_the_record() {
    use fedge_aggregator::ledger;
    use fedge_proto::ledger::{FLAG_COPY, LedgerRecord};
    for seed in SEEDS {
        let sim = run(seed);
        let settled = settlements(&sim);
        let s = &settled[0];
        let published = sim.published();
        let r = ledger::build_record(1, [0; 32], s, published[0].2).unwrap();
        let r = LedgerRecord::decode(&r.encode()).unwrap();
        let deltas = kept_deltas(&sim, &r);
        let base = sim::model(DIM).params.values;
        let recompute = |r: &LedgerRecord| {
            let mut h = Default::default();
            ledger::recompute_scores(r, &base, &deltas, &mut quadratic(), &mut h)
        };
        let (_, flags) = recompute(&r).unwrap();
        assert_eq!(flags, 7, "seed {seed}");
        let key = |i: usize| ledger::device_bytes(&sim.device_id(i)).unwrap();
        let at = |i: usize| r.entries.iter().position(|e| e.device == key(i)).unwrap();
        let (copy, original) = (at(6), at(0));
        assert_eq!(r.entries[copy].flags & FLAG_COPY, FLAG_COPY, "seed {seed}");
        let mut moved = r.clone();
        moved.entries[copy].flags &= !FLAG_COPY;
        let err = recompute(&moved).unwrap_err();
        assert!(err.contains(&sim.device_id(6)), "seed {seed}: {err}");
        moved.entries[original].flags |= FLAG_COPY;
        assert!(recompute(&moved).is_err(), "seed {seed}");
        // An honest entry marked unscored (and so unpaid) is named.
        let mut unscored = r.clone();
        unscored.entries[at(2)].flags |= fedge_proto::ledger::FLAG_UNSCORED;
        let err = recompute(&unscored).unwrap_err();
        assert!(err.contains(&sim.device_id(2)), "seed {seed}: {err}");
        // Scored in another order, the copy is the original's.
        let mut reordered = r.clone();
        reordered.flag_rules.as_mut().unwrap().order.reverse();
        assert!(recompute(&reordered).is_err(), "seed {seed}");
    }
}

/// A device that sends round 1's update again in round 2 is a stale
/// replay, across a restart of the aggregator too: the restarted
/// coordinator rebuilds its replay history from the ledger's last scored
/// rounds and their kept payloads, and a verifier going through the chain
/// recomputes the same flags.
#[test]
fn replays_across_a_restart_are_flagged_and_verify() {
    use fedge_aggregator::ledger;
    use fedge_proto::ModelBlob;
    use fedge_proto::ledger::{FLAG_FREE_RIDER, LedgerRecord};
    for seed in SEEDS {
        let mut specs = fleet(seed);
        specs[1].wobble = false; // the same update every round
        let mut sim = scored(seed, cfg(), specs);
        sim.run_until(Duration::from_secs(120), |s| s.published().len() == 1);
        let first = settlements(&sim).remove(0);
        let r1 = ledger::build_record(1, [0; 32], &first, sim.published()[0].2).unwrap();
        let payload = |sim: &Sim, round: u64, hash: &[u8; 32]| {
            sim.kept
                .iter()
                .find(|u| u.round_id == round && &u.payload_hash == hash)
                .map(|u| u.payload.to_vec())
                .ok_or_else(|| "not kept".to_string())
        };
        // What the state directory keeps of round 1: its payloads.
        let round1: std::collections::HashMap<[u8; 32], Vec<u8>> = r1
            .entries
            .iter()
            .map(|e| (e.payload_hash, payload(&sim, 1, &e.payload_hash).unwrap()))
            .collect();
        sim.restart_aggregator(true);
        sim.coord.set_evaluator(Box::new(quadratic()));
        sim.coord
            .restore_replay_history(std::slice::from_ref(&r1), |_, hash| {
                round1.get(hash).cloned().ok_or_else(|| "missing".into())
            });
        sim.run_until(Duration::from_secs(300), |s| s.coord.is_finished());
        let second = settlements(&sim).pop().unwrap();
        assert_eq!(second.round_id, 2, "seed {seed}");
        let replayer = sim.device_id(1);
        let e = second
            .entries
            .iter()
            .find(|e| e.device == replayer)
            .unwrap();
        assert!(e.free_rider && e.reward == 0, "seed {seed}: {e:?}");
        // The verifier, through the chain with one history.
        let r2 = ledger::build_record(2, r1.hash(), &second, sim.published()[1].2).unwrap();
        let key = ledger::device_bytes(&replayer).unwrap();
        let flagged = r2.entries.iter().find(|e| e.device == key).unwrap().flags;
        assert_ne!(flagged & FLAG_FREE_RIDER, 0, "seed {seed}");
        let mut models = vec![sim::model(DIM)];
        for e in &sim.events {
            if let Event::ModelPublished { blob, .. } = e {
                models.push(ModelBlob::decode(blob, &Default::default()).unwrap());
            }
        }
        let mut history = scoring::replay::History::default();
        for r in [r1, r2] {
            let r = LedgerRecord::decode(&r.encode()).unwrap();
            let deltas = kept_deltas(&sim, &r);
            let before = &models
                .iter()
                .find(|m| m.version().0 == r.model_before)
                .unwrap()
                .params
                .values;
            let mut eval = quadratic();
            let (_, flags) =
                ledger::recompute_scores(&r, before, &deltas, &mut eval, &mut history).unwrap();
            assert_eq!(flags, r.entries.len(), "seed {seed}");
        }
    }
}
