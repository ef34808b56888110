//! The MPU-6050 driver against scripted I2C transactions
//! (embedded-hal-mock), windowing into labelled samples, and training the
//! ONNX trainer on windows read back from the sample store.

use embedded_hal::i2c::{ErrorKind, NoAcknowledgeSource};
use embedded_hal_mock::eh1::i2c::{Mock, Transaction as T};
use fedge_device::sensor::mpu6050::{self, AccelRange, Config, GyroRange, Mpu6050};
use fedge_device::sensor::window::{
    self, ActivityClasses, FileLabel, FixedLabel, LabelSource, Pacer, Window, WindowSpec,
};
use fedge_device::sensor::{Imu, ImuSample, STANDARD_GRAVITY_MPS2, SensorError};
use fedge_device::store::SampleStore;
use fedge_device::trainer::{OnnxTrainer, Trainer};
use fedge_engine::data::Features;
use fedge_proto::msg::TrainingPlan;

const ADDR: u8 = mpu6050::ADDR_AD0_LOW;

/// The bring-up the driver must perform with the default config
/// (±4 g, ±500 deg/s, DLPF 3, divider 9).
fn init_sequence() -> Vec<T> {
    vec![
        T::write_read(ADDR, vec![0x75], vec![0x68]),
        T::write(ADDR, vec![0x6B, 0x01]),
        T::write(ADDR, vec![0x19, 9]),
        T::write(ADDR, vec![0x1A, 3]),
        T::write(ADDR, vec![0x1B, 1 << 3]),
        T::write(ADDR, vec![0x1C, 1 << 3]),
    ]
}

/// A burst whose values are known: at ±4 g (8192 LSB/g) and ±500 deg/s
/// (65.5 LSB per deg/s).
const BURST: [u8; 14] = [
    0x20, 0x00, // ax = 8192 -> +1 g
    0xF0, 0x00, // ay = -4096 -> -0.5 g
    0xE0, 0x00, // az = -8192 -> -1 g
    0xFC, 0x18, // temp = -1000 -> -1000/340 + 36.53 C
    0x02, 0x8F, // gx = 655 -> 10 deg/s
    0xE6, 0x6A, // gy = -6550 -> -100 deg/s
    0x00, 0x00, // gz = 0
];

fn burst() -> T {
    T::write_read(ADDR, vec![0x3B], BURST.to_vec())
}

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-4 * b.abs().max(1.0)
}

#[test]
fn init_writes_the_register_sequence_then_bursts_decode_to_physical_units() {
    let mut expected = init_sequence();
    expected.push(burst());
    let mut bus = Mock::new(&expected);
    let mut imu = Mpu6050::new(bus.clone(), ADDR, Config::default()).unwrap();
    let r = imu.read().unwrap();
    let g = STANDARD_GRAVITY_MPS2;
    let want_accel = [g, -0.5 * g, -g];
    let want_gyro = [10.0, -100.0, 0.0];
    for i in 0..3 {
        assert!(close(r.sample.accel_mps2[i], want_accel[i]), "{r:?}");
        assert!(close(r.sample.gyro_dps[i], want_gyro[i]), "{r:?}");
    }
    assert!(close(r.temperature_c, -1000.0 / 340.0 + 36.53), "{r:?}");
    bus.done();
}

#[test]
fn ranges_change_the_configuration_writes_and_the_scaling() {
    let cfg = Config {
        accel_range: AccelRange::G16,
        gyro_range: GyroRange::Dps2000,
        dlpf_cfg: 0,
        sample_rate_div: 0,
        attempts_max: 1,
    };
    let mut bus = Mock::new(&[
        T::write_read(ADDR, vec![0x75], vec![0x68]),
        T::write(ADDR, vec![0x6B, 0x01]),
        T::write(ADDR, vec![0x19, 0]),
        T::write(ADDR, vec![0x1A, 0]),
        T::write(ADDR, vec![0x1B, 0x18]),
        T::write(ADDR, vec![0x1C, 0x18]),
        burst(),
    ]);
    let mut imu = Mpu6050::new(bus.clone(), ADDR, cfg).unwrap();
    let s = imu.read_sample().unwrap();
    // 8192 LSB at 2048 LSB/g is 4 g; 655 LSB at 16.4 LSB/(deg/s).
    assert!(close(s.accel_mps2[0], 4.0 * STANDARD_GRAVITY_MPS2), "{s:?}");
    assert!(close(s.gyro_dps[0], 655.0 / 16.4), "{s:?}");
    bus.done();
}

#[test]
fn another_chip_id_is_a_wrong_chip_error_with_the_value_read() {
    // An MPU-6500 answers 0x70: nothing is written to it.
    let mut bus = Mock::new(&[T::write_read(ADDR, vec![0x75], vec![0x70])]);
    let err = Mpu6050::new(bus.clone(), ADDR, Config::default())
        .err()
        .expect("wrong chip accepted");
    match &err {
        SensorError::WrongChip {
            found, expected, ..
        } => assert_eq!((*found, *expected), (0x70, 0x68)),
        e => panic!("expected WrongChip, got {e}"),
    }
    assert!(err.to_string().contains("0x70"), "{err}");
    bus.done();
}

#[test]
fn a_disconnected_sensor_is_reported_after_a_bounded_number_of_tries() {
    let nack = ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address);
    // Exactly `attempts_max` (3) tries; `done()` fails if a fourth was made.
    let tries: Vec<T> = (0..3)
        .map(|_| T::write_read(ADDR, vec![0x75], vec![0]).with_error(nack))
        .collect();
    let mut bus = Mock::new(&tries);
    let err = Mpu6050::new(bus.clone(), ADDR, Config::default())
        .err()
        .expect("a silent bus must not give a sensor");
    match &err {
        SensorError::NotResponding { addr, attempts, .. } => {
            assert_eq!((*addr, *attempts), (ADDR, 3))
        }
        e => panic!("expected NotResponding, got {e}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("no device acknowledged") && msg.contains("0x68"),
        "{msg}"
    );
    assert_eq!(err.bus_kind(), Some(nack));
    bus.done();
}

#[test]
fn a_bus_error_mid_read_is_typed_and_the_sensor_recovers() {
    let mut expected = init_sequence();
    expected.push(burst());
    // The second reading fails on every try.
    for _ in 0..3 {
        expected.push(T::write_read(ADDR, vec![0x3B], vec![0; 14]).with_error(ErrorKind::Bus));
    }
    // The third fails once (lost arbitration), then succeeds on the retry.
    expected
        .push(T::write_read(ADDR, vec![0x3B], vec![0; 14]).with_error(ErrorKind::ArbitrationLoss));
    expected.push(burst());
    let mut bus = Mock::new(&expected);
    let mut imu = Mpu6050::new(bus.clone(), ADDR, Config::default()).unwrap();
    let first = imu.read().unwrap();
    let err = imu.read().unwrap_err();
    match &err {
        SensorError::Bus {
            kind, attempts, op, ..
        } => {
            assert_eq!((*kind, *attempts, *op), (ErrorKind::Bus, 3, "burst read"));
        }
        e => panic!("expected Bus, got {e}"),
    }
    assert_eq!(imu.read().unwrap(), first, "a transient error is retried");
    bus.done();
}

/// Samples from a script, for windowing without a bus.
struct Scripted(Vec<ImuSample>, usize);

impl Imu for Scripted {
    fn read_sample(&mut self) -> Result<ImuSample, SensorError> {
        let s = self.0[self.1 % self.0.len()];
        self.1 += 1;
        Ok(s)
    }
}

/// Counts ticks instead of sleeping.
#[derive(Default)]
struct Ticks(usize);

impl Pacer for Ticks {
    fn wait_tick(&mut self) {
        self.0 += 1;
    }
}

/// Labels from a script, one per call.
struct Tags(Vec<Option<u32>>);

impl LabelSource for Tags {
    fn current(&mut self) -> Result<Option<u32>, SensorError> {
        Ok(self.0.remove(0))
    }
}

fn sample(i: usize) -> ImuSample {
    let v = i as f32;
    ImuSample {
        accel_mps2: [v, v + 0.25, STANDARD_GRAVITY_MPS2],
        gyro_dps: [250.0, -v, 0.5],
    }
}

#[test]
fn windows_sample_every_tick_through_the_driver_and_keep_their_label() {
    let spec = WindowSpec {
        samples: 4,
        rate_hz: 50.0,
    };
    let mut expected = init_sequence();
    expected.extend((0..4).map(|_| burst()));
    let mut bus = Mock::new(&expected);
    let mut imu = Mpu6050::new(bus.clone(), ADDR, Config::default()).unwrap();
    let mut ticks = Ticks::default();
    let w = window::collect_window(&mut imu, &mut FixedLabel(2), &spec, &mut ticks)
        .unwrap()
        .expect("a tagged window");
    assert_eq!(ticks.0, 4);
    assert_eq!(w.label, 2);
    assert_eq!(w.samples.len(), 4);
    assert!(close(w.samples[3][0], STANDARD_GRAVITY_MPS2));
    assert!(close(w.samples[3][4], -100.0));
    bus.done();
}

#[test]
fn untagged_or_retagged_windows_are_dropped() {
    let spec = WindowSpec {
        samples: 3,
        rate_hz: 10.0,
    };
    let mut imu = Scripted((0..100).map(sample).collect(), 0);
    let mut ticks = Ticks::default();
    let mut run = |tags: Vec<Option<u32>>| {
        window::collect_window(&mut imu, &mut Tags(tags), &spec, &mut ticks).unwrap()
    };
    assert!(run(vec![Some(1), Some(0)]).is_none(), "tag changed");
    assert!(run(vec![None, None]).is_none(), "untagged");
    assert!(run(vec![Some(1), None]).is_none(), "tag cleared");
    let w = run(vec![Some(1), Some(1)]).unwrap();
    assert_eq!(w.label, 1);
    assert_eq!(
        w.samples[0][0], 9.0,
        "sampling went on across dropped windows"
    );
    let bad = WindowSpec {
        samples: 0,
        rate_hz: 10.0,
    };
    assert!(matches!(
        window::collect_window(&mut imu, &mut FixedLabel(0), &bad, &mut ticks),
        Err(SensorError::Invalid(_))
    ));
}

#[test]
fn file_labels_map_class_names_and_reject_unknown_ones() {
    let dir = tempfile::tempdir().unwrap();
    let classes = ActivityClasses::parse("still, walking,running").unwrap();
    let mut src = FileLabel {
        path: dir.path().join("activity"),
        classes,
    };
    assert_eq!(src.current().unwrap(), None, "no file: untagged");
    std::fs::write(&src.path, "walking\n").unwrap();
    assert_eq!(src.current().unwrap(), Some(1));
    std::fs::write(&src.path, "  \n").unwrap();
    assert_eq!(src.current().unwrap(), None, "empty: untagged");
    std::fs::write(&src.path, "swimming").unwrap();
    let err = src.current().unwrap_err().to_string();
    assert!(
        err.contains("swimming") && err.contains("still,walking,running"),
        "{err}"
    );
    assert!(ActivityClasses::parse("a,,b").is_err());
    assert!(ActivityClasses::parse("a,b,a").is_err());
}

#[test]
fn windows_round_trip_through_records_and_become_channels_first_normalized_samples() {
    let w = Window {
        label: 1,
        samples: (0..4)
            .map(|i| {
                let s = sample(i);
                [
                    s.accel_mps2[0],
                    s.accel_mps2[1],
                    s.accel_mps2[2],
                    s.gyro_dps[0],
                    s.gyro_dps[1],
                    s.gyro_dps[2],
                ]
            })
            .collect(),
    };
    let bytes = w.encode();
    assert_eq!(bytes.len(), window::record_bytes(4));
    assert_eq!(Window::decode(&bytes), Some(w.clone()));
    assert_eq!(Window::decode(&bytes[1..]), None, "not a window size");
    let mut nan = bytes.clone();
    nan[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
    assert_eq!(Window::decode(&nan), None, "non-finite values rejected");

    let d = window::to_dataset(&[w.clone(), Window { label: 0, ..w }], Some(3)).unwrap();
    assert_eq!(d.sample_shape, vec![6, 4]);
    assert_eq!((d.len(), d.classes), (2, 3));
    let Features::F32(f) = &d.features else {
        panic!("float features")
    };
    // Channel 0 (accel x) over time, then channel 1, ...: accel in g,
    // gyro in units of 250 deg/s.
    let g = STANDARD_GRAVITY_MPS2;
    assert_eq!(&f[0..4], &[0.0, 1.0 / g, 2.0 / g, 3.0 / g]);
    assert_eq!(&f[8..12], &[1.0; 4]);
    assert_eq!(&f[12..16], &[1.0; 4]);
    assert_eq!(&f[16..20], &[0.0, -1.0 / 250.0, -2.0 / 250.0, -3.0 / 250.0]);
    assert!(
        window::to_dataset(
            &[Window {
                label: 5,
                ..sample_window(1)
            }],
            Some(3)
        )
        .is_err()
    );
}

fn sample_window(n: usize) -> Window {
    Window {
        label: 0,
        samples: vec![[0.0; 6]; n],
    }
}

/// Synthetic activity: still (gravity and a little tremor), walking
/// (2 Hz sway, moderate rotation) and running (3 Hz, three times larger),
/// each window with its own phase.
fn activity_window(class: u32, k: usize, samples: usize, rate_hz: f32) -> Window {
    let phase = (k as f32 * 0.7311) % std::f32::consts::TAU;
    let (f, amp, rot) = match class {
        0 => (0.5, 0.05, 1.0),
        1 => (2.0, 2.0, 60.0),
        _ => (3.0, 6.0, 180.0),
    };
    let g = STANDARD_GRAVITY_MPS2;
    Window {
        label: class,
        samples: (0..samples)
            .map(|i| {
                let t = i as f32 / rate_hz;
                let s = (std::f32::consts::TAU * f * t + phase).sin();
                let c = (std::f32::consts::TAU * f * t + phase).cos();
                [
                    amp * s,
                    0.5 * amp * c,
                    g + amp * s,
                    rot * c,
                    rot * s,
                    0.2 * rot * c,
                ]
            })
            .collect(),
    }
}

/// Flatten -> Gemm(16) -> Relu -> Gemm(3), for `[6, 64]` windows.
fn activity_mlp() -> fedge_proto::ModelBlob {
    use fedge_engine::train::onnx::pb::{GraphProto, ModelProto, OperatorSetIdProto};
    use fedge_engine::train::onnx::{self, F32};
    use prost::Message;
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut u = |n: usize, bound: f32| -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-bound..bound)).collect()
    };
    let (inp, hidden) = (6 * 64, 16);
    let b1 = 1.0 / (inp as f32).sqrt();
    let b2 = 1.0 / (hidden as f32).sqrt();
    let m = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(GraphProto {
            node: vec![
                onnx::node(
                    "Flatten",
                    "flat",
                    &["input"],
                    &["f"],
                    vec![onnx::int("axis", 1)],
                ),
                onnx::node(
                    "Gemm",
                    "fc1",
                    &["f", "fc1.weight", "fc1.bias"],
                    &["h"],
                    vec![onnx::int("transB", 1)],
                ),
                onnx::node("Relu", "relu", &["h"], &["r"], vec![]),
                onnx::node(
                    "Gemm",
                    "fc2",
                    &["r", "fc2.weight", "fc2.bias"],
                    &["logits"],
                    vec![onnx::int("transB", 1)],
                ),
            ],
            initializer: vec![
                onnx::tensor_f32("fc1.weight", &[hidden, inp], &u(hidden * inp, b1)),
                onnx::tensor_f32("fc1.bias", &[hidden], &u(hidden, b1)),
                onnx::tensor_f32("fc2.weight", &[3, hidden], &u(3 * hidden, b2)),
                onnx::tensor_f32("fc2.bias", &[3], &u(3, b2)),
            ],
            input: vec![onnx::value_info("input", F32, &[1, 6, 64])],
            output: vec![onnx::value_info("logits", F32, &[1, 3])],
            ..Default::default()
        }),
        ..Default::default()
    };
    fedge_engine::train::import::import_onnx(&m.encode_to_vec()).unwrap()
}

#[test]
fn the_trainer_learns_activities_from_windows_in_the_sample_store() {
    let spec = WindowSpec::default();
    let dir = tempfile::tempdir().unwrap();
    // 40 windows per class into a store that keeps 100: the 20 oldest
    // (all "still") are overwritten.
    let mut store = SampleStore::open_or_create(dir.path(), spec.record_bytes(), 100).unwrap();
    for k in 0..120 {
        let w = activity_window((k % 3) as u32, k, spec.samples, spec.rate_hz as f32);
        store.append(&w.encode()).unwrap();
    }
    drop(store);
    let data = window::load_store(dir.path()).unwrap();
    assert_eq!(data.len(), 100);
    assert_eq!(data.sample_shape, vec![6, 64]);
    assert_eq!(data.label_counts(), vec![33, 33, 34]);

    let mut model = activity_mlp();
    let mut trainer = OnnxTrainer::new(data, 5);
    let plan = TrainingPlan {
        batch_size: 10,
        local_epochs: 5,
        learning_rate: 0.1,
        ..TrainingPlan::default()
    };
    let mut losses = Vec::new();
    for round in 0..4 {
        let out = trainer.train(round, &model, &plan).unwrap();
        assert_eq!(out.sample_count, 100);
        losses.push(
            out.metrics
                .iter()
                .find(|(k, _)| k == "train_loss")
                .unwrap()
                .1,
        );
        for (p, d) in model.params.values.iter_mut().zip(&out.delta) {
            *p += d;
        }
    }
    // Chance for three balanced classes is ln 3 = 1.10.
    assert!(
        losses.windows(2).all(|w| w[1] < w[0]) && losses[3] < 0.5 * 3f64.ln(),
        "loss did not fall well below chance: {losses:?}"
    );
}

#[test]
fn loading_an_empty_or_missing_store_explains_itself() {
    let dir = tempfile::tempdir().unwrap();
    let err = window::load_store(dir.path()).unwrap_err().to_string();
    assert!(err.contains("collect"), "{err}");
    SampleStore::open_or_create(dir.path(), window::record_bytes(64), 4).unwrap();
    let err = window::load_store(dir.path()).unwrap_err().to_string();
    assert!(err.contains("no windows yet"), "{err}");
}
