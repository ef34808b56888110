//! Sensor data on the device: IMU drivers written against the
//! embedded-hal 1.0 I2C trait, and the windowing that turns IMU samples
//! into an activity-recognition data set (the engine's `Dataset`).
//!
//! - [`mpu6050`]: the InvenSense MPU-6050 (3-axis accelerometer and
//!   gyroscope), from its register map.
//! - `window` (feature `engine`): fixed-rate sampling into fixed windows with a label,
//!   the window record kept in the sample store ([`crate::store`]), and
//!   the normalized data set the trainer reads.
//! - `linux` (feature `sensors-linux`): the Linux I2C bus (`/dev/i2c-N`).
//!
//! **Invariant: no hangs.** Every bus operation is tried at most
//! `attempts_max` times (bounded, default 3) and then reported as a
//! typed [`SensorError`]; no driver loop waits on the bus without a bound.

use embedded_hal::i2c::{ErrorKind, NoAcknowledgeSource};

#[cfg(feature = "sensors-linux")]
pub mod linux;
pub mod mpu6050;
#[cfg(feature = "engine")]
pub mod window;

/// Standard gravity, m/s^2 per g.
pub const STANDARD_GRAVITY_MPS2: f32 = 9.80665;

/// One IMU reading in physical units.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ImuSample {
    /// Acceleration (x, y, z) in m/s^2; at rest one axis reads about 9.81.
    pub accel_mps2: [f32; 3],
    /// Angular rate (x, y, z) in degrees per second.
    pub gyro_dps: [f32; 3],
}

/// Something that yields IMU samples (a driver, or a recording in tests).
pub trait Imu {
    fn read_sample(&mut self) -> Result<ImuSample, SensorError>;
}

#[derive(Debug, thiserror::Error)]
pub enum SensorError {
    /// Nothing answered at the address: wrong address, loose wire,
    /// sensor unpowered.
    #[error(
        "no device acknowledged I2C address {addr:#04x} during {op} ({attempts} attempts; {detail}): check the wiring, the sensor's power and the address"
    )]
    NotResponding {
        addr: u8,
        op: &'static str,
        attempts: u32,
        detail: String,
    },
    /// The bus reported an error on every attempt.
    #[error(
        "I2C bus error at address {addr:#04x} during {op}: {kind} ({attempts} attempts; {detail})"
    )]
    Bus {
        addr: u8,
        op: &'static str,
        kind: ErrorKind,
        attempts: u32,
        detail: String,
    },
    /// Something answered, but its identity register says it is another chip.
    #[error(
        "the device at I2C address {addr:#04x} is not a {chip}: register {register:#04x} reads {found:#04x}, expected {expected:#04x}"
    )]
    WrongChip {
        addr: u8,
        chip: &'static str,
        register: u8,
        found: u8,
        expected: u8,
    },
    /// The bus device could not be opened.
    #[error("cannot open I2C bus {path}: {source}{hint}")]
    Open {
        path: std::path::PathBuf,
        source: std::io::Error,
        hint: &'static str,
    },
    /// A label source could not be read or named an unknown class.
    #[error("label: {0}")]
    Label(String),
    /// A bad argument (window size, sample rate, class list).
    #[error("{0}")]
    Invalid(String),
}

impl SensorError {
    /// The HAL error kind, for bus errors.
    pub fn bus_kind(&self) -> Option<ErrorKind> {
        match self {
            SensorError::Bus { kind, .. } => Some(*kind),
            SensorError::NotResponding { .. } => {
                Some(ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address))
            }
            _ => None,
        }
    }
}

/// Run one bus operation at most `attempts_max` times (at least once),
/// returning the first success or a typed error built from the last
/// failure. A NACK of the address (or an unknown NACK) is reported as
/// [`SensorError::NotResponding`], everything else as [`SensorError::Bus`].
pub(crate) fn with_retries<T, E: embedded_hal::i2c::Error>(
    addr: u8,
    op: &'static str,
    attempts_max: u32,
    mut f: impl FnMut() -> Result<T, E>,
) -> Result<T, SensorError> {
    let attempts_max = attempts_max.max(1);
    let mut last: Option<E> = None;
    for _ in 0..attempts_max {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) => last = Some(e),
        }
    }
    let e = last.expect("at least one attempt ran");
    let detail = format!("{e:?}");
    Err(match e.kind() {
        ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address | NoAcknowledgeSource::Unknown) => {
            SensorError::NotResponding {
                addr,
                op,
                attempts: attempts_max,
                detail,
            }
        }
        kind => SensorError::Bus {
            addr,
            op,
            kind,
            attempts: attempts_max,
            detail,
        },
    })
}
