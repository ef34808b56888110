//! Downlink compression on a simulated fleet (no sockets, virtual time):
//! with `[strategy] downlink`, devices holding an earlier version replay
//! the compressed steps to exactly the model the aggregator published
//! (every model a device trains on is a published version, which the
//! content hash checked), and fetch far fewer chunks than with whole
//! models.

use crate::sim;

use std::time::Duration;

use fedge_aggregator::coordinator::CoordinatorConfig;
use fedge_aggregator::strategy::StrategyConfig;
use fedge_device::session::DeviceEvent;
use rand::{Rng, SeedableRng};
use sim::{DeviceSpec, NetConfig, Sim};

const SEEDS: [u64; 3] = [1, 7, 42];
const DIM: usize = 256;
const ROUNDS: u64 = 6;

fn run(seed: u64, downlink: Option<&str>) -> Sim {
    let cfg = CoordinatorConfig {
        devices_per_round: 4,
        over_selection: 1.0,
        min_devices: 4,
        rounds: ROUNDS,
        round_deadline: Duration::from_secs(10),
        retry_window: (Duration::from_millis(100), Duration::from_millis(300)),
        chunk_bytes: 128,
        strategy: StrategyConfig {
            downlink: downlink.map(str::to_string),
            ..StrategyConfig::default()
        },
        ..CoordinatorConfig::default()
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let specs = (0..6)
        .map(|_| DeviceSpec {
            vector: Some((0..DIM).map(|_| rng.random::<f32>() - 0.5).collect()),
            ..DeviceSpec::new(0.0, 10)
        })
        .collect();
    let mut sim = Sim::with_model(seed, cfg, NetConfig::default(), specs, sim::model(DIM));
    sim.run_to_end(Duration::from_secs(600));
    sim
}

#[test]
fn devices_replay_compressed_steps_to_the_published_models() {
    for seed in SEEDS {
        let plain = run(seed, None);
        let compressed = run(seed, Some("topk:0.1+q8"));
        for sim in [&plain, &compressed] {
            assert_eq!(sim.published().len(), ROUNDS as usize, "seed {seed}");
        }
        let published: Vec<_> = compressed.published().iter().map(|p| p.2).collect();
        let mut trained = 0;
        for i in 0..compressed.device_count() {
            for e in compressed.device_events(i) {
                if let DeviceEvent::Train {
                    round_id, model, ..
                } = e
                {
                    trained += 1;
                    if *round_id > 1 {
                        // The model of round r is the version round r-1
                        // published.
                        assert_eq!(
                            model.version(),
                            published[*round_id as usize - 2],
                            "seed {seed} device {i} round {round_id}"
                        );
                    }
                }
            }
        }
        assert!(trained >= 4 * ROUNDS as usize, "seed {seed}: {trained}");
        let chunks = |s: &Sim| {
            (0..s.device_count())
                .map(|i| s.chunk_requests(i))
                .sum::<usize>()
        };
        // Round 1 fetches whole models either way; after it, steps.
        assert!(
            chunks(&compressed) * 10 < chunks(&plain) * 6,
            "seed {seed}: {} chunk requests compressed, {} whole",
            chunks(&compressed),
            chunks(&plain)
        );
    }
}
