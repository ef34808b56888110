//! `fedge-device collect`: labelled IMU windows from an MPU-6050 on I2C
//! into the local sample store (`imu:STORE_DIR` data for training).

use std::path::PathBuf;

use anyhow::Context;

#[derive(clap::Args)]
pub(crate) struct CollectArgs {
    /// I2C bus device.
    #[arg(long, default_value = "/dev/i2c-1")]
    i2c: PathBuf,
    /// The sensor's I2C address: 0x68, or 0x69 with AD0 high.
    #[arg(long, default_value = "0x68", value_parser = parse_i2c_addr)]
    addr: u8,
    /// Sample store directory (created if needed).
    #[arg(long, default_value = "fedge-device-state/samples")]
    store: PathBuf,
    /// Windows the store keeps; the oldest are overwritten.
    #[arg(long, default_value_t = 10_000)]
    store_windows: u64,
    /// Samples per window.
    #[arg(long, default_value_t = fedge_device::sensor::window::WINDOW_SAMPLES_DEFAULT)]
    window: usize,
    /// Sampling rate, Hz.
    #[arg(long, default_value_t = 50.0)]
    rate_hz: f64,
    /// Activity classes, in class-index order (the same on every device).
    #[arg(long, default_value = "still,walking,running")]
    classes: String,
    /// Label every window with this activity.
    #[arg(
        long,
        conflicts_with = "label_file",
        required_unless_present = "label_file"
    )]
    label: Option<String>,
    /// Read the current activity from this file (written by the app the
    /// user tags activities with); untagged windows are dropped.
    #[arg(long)]
    label_file: Option<PathBuf>,
    /// Stop after this many stored windows (0: until interrupted).
    #[arg(long, default_value_t = 0)]
    windows: u64,
    /// Accelerometer full scale: 2, 4, 8 or 16 (g).
    #[arg(long, default_value_t = 4)]
    accel_range_g: u8,
    /// Gyroscope full scale: 250, 500, 1000 or 2000 (deg/s).
    #[arg(long, default_value_t = 500)]
    gyro_range_dps: u16,
}

fn parse_i2c_addr(s: &str) -> Result<u8, String> {
    let v = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u8::from_str_radix(h, 16),
        None => s.parse(),
    }
    .map_err(|_| format!("`{s}` is not an I2C address (e.g. 0x68)"))?;
    if !(0x08..=0x77).contains(&v) {
        return Err(format!(
            "{v:#04x} is outside the 7-bit address range 0x08..=0x77"
        ));
    }
    Ok(v)
}

pub(crate) fn collect(a: CollectArgs) -> anyhow::Result<()> {
    use fedge_device::sensor::mpu6050::{AccelRange, Config, GyroRange};
    use fedge_device::sensor::window::{ActivityClasses, WindowSpec};
    let spec = WindowSpec {
        samples: a.window,
        rate_hz: a.rate_hz,
    };
    spec.validate()?;
    let classes = ActivityClasses::parse(&a.classes)?;
    let accel_range = match a.accel_range_g {
        2 => AccelRange::G2,
        4 => AccelRange::G4,
        8 => AccelRange::G8,
        16 => AccelRange::G16,
        g => anyhow::bail!("--accel-range-g {g}: use 2, 4, 8 or 16"),
    };
    let gyro_range = match a.gyro_range_dps {
        250 => GyroRange::Dps250,
        500 => GyroRange::Dps500,
        1000 => GyroRange::Dps1000,
        2000 => GyroRange::Dps2000,
        d => anyhow::bail!("--gyro-range-dps {d}: use 250, 500, 1000 or 2000"),
    };
    let cfg = Config {
        accel_range,
        gyro_range,
        ..Config::default()
    };
    let fixed = a.label.as_deref().map(|l| classes.require(l)).transpose()?;
    std::fs::create_dir_all(&a.store)
        .with_context(|| format!("cannot create the sample store {}", a.store.display()))?;
    let mut store = fedge_device::store::SampleStore::open_or_create(
        &a.store,
        spec.record_bytes(),
        a.store_windows,
    )?;
    if store.skipped_on_open() > 0 {
        tracing::warn!(
            skipped = store.skipped_on_open(),
            "sample store had unreadable records (a write cut short by a crash); they were skipped"
        );
    }
    collect_from_sensor(&a, spec, cfg, classes, fixed, &mut store)
}

#[cfg(feature = "sensors-linux")]
fn collect_from_sensor(
    a: &CollectArgs,
    spec: fedge_device::sensor::window::WindowSpec,
    cfg: fedge_device::sensor::mpu6050::Config,
    classes: fedge_device::sensor::window::ActivityClasses,
    fixed: Option<u32>,
    store: &mut fedge_device::store::SampleStore,
) -> anyhow::Result<()> {
    use fedge_device::sensor::window::{
        FileLabel, FixedLabel, FixedRate, LabelSource, collect_window,
    };
    let bus = fedge_device::sensor::linux::open(&a.i2c)?;
    let mut imu = fedge_device::sensor::mpu6050::Mpu6050::new(bus, a.addr, cfg)?;
    // Let the gyro PLL settle after wake-up before the first window.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let mut labels: Box<dyn LabelSource> = match (fixed, &a.label_file) {
        (Some(l), _) => Box::new(FixedLabel(l)),
        (None, Some(path)) => Box::new(FileLabel {
            path: path.clone(),
            classes,
        }),
        (None, None) => anyhow::bail!("pass --label ACTIVITY or --label-file FILE"),
    };
    let mut pacer = FixedRate::new(spec.period());
    let (mut stored, mut dropped) = (0u64, 0u64);
    tracing::info!(
        i2c = %a.i2c.display(), addr = format!("{:#04x}", a.addr), store = %store.path().display(),
        "collecting {}-sample windows at {} Hz", spec.samples, spec.rate_hz
    );
    while a.windows == 0 || stored < a.windows {
        match collect_window(&mut imu, labels.as_mut(), &spec, &mut pacer)? {
            Some(w) => {
                let seq = store.append(&w.encode())?;
                stored += 1;
                tracing::info!(seq, label = w.label, "window stored");
            }
            None => {
                dropped += 1;
                tracing::debug!("window dropped: untagged, or the tag changed");
            }
        }
    }
    println!(
        "stored {stored} windows ({dropped} dropped untagged), store holds {} of {}; {} late samples",
        store.len(),
        store.capacity(),
        pacer.overruns
    );
    Ok(())
}

#[cfg(not(feature = "sensors-linux"))]
fn collect_from_sensor(
    _: &CollectArgs,
    _: fedge_device::sensor::window::WindowSpec,
    _: fedge_device::sensor::mpu6050::Config,
    _: fedge_device::sensor::window::ActivityClasses,
    _: Option<u32>,
    _: &mut fedge_device::store::SampleStore,
) -> anyhow::Result<()> {
    anyhow::bail!(
        "this fedge-device was built without Linux sensor support: rebuild with `cargo build -p fedge-device --features sensors-linux`"
    )
}
