//! Activity recognition from an IMU: sample at a fixed rate into fixed
//! windows (default 64 samples x 6 channels: accel x/y/z, gyro x/y/z),
//! label each window, keep windows as fixed-size records in the sample
//! store, and turn them into a [`Dataset`] the trainer reads.
//!
//! **Labels.** A window's label is the user's current activity tag,
//! read from a [`LabelSource`] when the window starts and again when it
//! ends; a window whose tag is missing at either end, or changed in
//! between, is dropped (it would mix two activities or none). Tags are
//! class names (`still`, `walking`, ...); an [`ActivityClasses`] list maps
//! them to class indices, so every device must use the same list.
//!
//! **Normalization.** Features are scaled by fixed physical constants
//! (acceleration in g, angular rate in units of 250 deg/s), not by
//! statistics of the local data: every device in a federation then feeds
//! the model the same units, which per-device z-scoring would break.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{Imu, STANDARD_GRAVITY_MPS2, SensorError};
use crate::store::SampleStore;
use fedge_engine::data::{DataError, Dataset, Features};

/// Channels per sample: accel x/y/z (m/s^2), gyro x/y/z (deg/s).
pub const CHANNELS: usize = 6;
/// Default window length in samples.
pub const WINDOW_SAMPLES_DEFAULT: usize = 64;
/// Longest window accepted.
pub const WINDOW_SAMPLES_MAX: usize = 4096;
/// Acceleration is divided by this (1 g) in the data set.
pub const ACCEL_SCALE_MPS2: f32 = STANDARD_GRAVITY_MPS2;
/// Angular rate is divided by this in the data set.
pub const GYRO_SCALE_DPS: f32 = 250.0;
/// Most classes a class list may name.
pub const CLASSES_MAX: usize = 256;

/// How windows are sampled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WindowSpec {
    /// Samples per window.
    pub samples: usize,
    /// Sampling rate, Hz.
    pub rate_hz: f64,
}

impl Default for WindowSpec {
    fn default() -> Self {
        WindowSpec {
            samples: WINDOW_SAMPLES_DEFAULT,
            rate_hz: 50.0,
        }
    }
}

impl WindowSpec {
    pub fn validate(&self) -> Result<(), SensorError> {
        if self.samples == 0 || self.samples > WINDOW_SAMPLES_MAX {
            return Err(SensorError::Invalid(format!(
                "window of {} samples: use 1..={WINDOW_SAMPLES_MAX}",
                self.samples
            )));
        }
        if !(self.rate_hz.is_finite() && self.rate_hz > 0.0 && self.rate_hz <= 1000.0) {
            return Err(SensorError::Invalid(format!(
                "sample rate {} Hz: use (0, 1000]",
                self.rate_hz
            )));
        }
        Ok(())
    }

    /// Time between samples.
    pub fn period(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.rate_hz)
    }

    /// Bytes of one window record in the store.
    pub fn record_bytes(&self) -> usize {
        record_bytes(self.samples)
    }
}

/// Bytes of a window record of `samples` samples: the label (u32) then
/// the samples, time-major, each `CHANNELS` little-endian f32.
pub fn record_bytes(samples: usize) -> usize {
    4 + samples * CHANNELS * 4
}

/// Samples per window for a record size, if it is a window record size.
pub fn samples_for_record_bytes(bytes: usize) -> Option<usize> {
    let body = bytes.checked_sub(4)?;
    (body > 0 && body % (CHANNELS * 4) == 0).then_some(body / (CHANNELS * 4))
}

/// One labelled window of raw samples in physical units.
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    pub label: u32,
    /// `[accel x, y, z (m/s^2), gyro x, y, z (deg/s)]` per sample.
    pub samples: Vec<[f32; CHANNELS]>,
}

impl Window {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(record_bytes(self.samples.len()));
        out.extend_from_slice(&self.label.to_le_bytes());
        for s in &self.samples {
            for v in s {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out
    }

    /// Decode a record; `None` if it is not a window record or holds a
    /// non-finite value.
    pub fn decode(bytes: &[u8]) -> Option<Window> {
        let n = samples_for_record_bytes(bytes.len())?;
        let label = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
        let mut samples = Vec::with_capacity(n);
        for chunk in bytes[4..].chunks_exact(CHANNELS * 4) {
            let mut s = [0f32; CHANNELS];
            for (c, v) in s.iter_mut().enumerate() {
                *v = f32::from_le_bytes(chunk[4 * c..4 * c + 4].try_into().expect("4 bytes"));
            }
            if s.iter().any(|v| !v.is_finite()) {
                return None;
            }
            samples.push(s);
        }
        Some(Window { label, samples })
    }
}

/// Class names in index order, e.g. `still,walking,running`.
#[derive(Clone, Debug, PartialEq)]
pub struct ActivityClasses {
    pub names: Vec<String>,
}

impl ActivityClasses {
    pub fn parse(s: &str) -> Result<Self, SensorError> {
        let names: Vec<String> = s.split(',').map(|n| n.trim().to_string()).collect();
        if names.iter().any(String::is_empty) || names.len() > CLASSES_MAX {
            return Err(SensorError::Invalid(format!(
                "class list `{s}`: give 1..={CLASSES_MAX} comma-separated non-empty names"
            )));
        }
        for (i, n) in names.iter().enumerate() {
            if names[..i].contains(n) {
                return Err(SensorError::Invalid(format!(
                    "class list `{s}` names `{n}` twice"
                )));
            }
        }
        Ok(ActivityClasses { names })
    }

    pub fn index(&self, name: &str) -> Option<u32> {
        self.names.iter().position(|n| n == name).map(|i| i as u32)
    }

    /// The index of `name`, or an error listing the known classes.
    pub fn require(&self, name: &str) -> Result<u32, SensorError> {
        self.index(name).ok_or_else(|| {
            SensorError::Label(format!(
                "activity `{name}` is not one of the classes {}",
                self.names.join(",")
            ))
        })
    }
}

/// Where a window's label comes from.
pub trait LabelSource {
    /// The current class index, or `None` when no activity is tagged.
    fn current(&mut self) -> Result<Option<u32>, SensorError>;
}

/// Every window gets the same label (`collect --label walking`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FixedLabel(pub u32);

impl LabelSource for FixedLabel {
    fn current(&mut self) -> Result<Option<u32>, SensorError> {
        Ok(Some(self.0))
    }
}

/// The label is the class name written in a file (by the app the user
/// tags their activity with): a missing or empty file means "untagged";
/// a name that is not a class is an error.
#[derive(Clone, Debug)]
pub struct FileLabel {
    pub path: PathBuf,
    pub classes: ActivityClasses,
}

impl LabelSource for FileLabel {
    fn current(&mut self) -> Result<Option<u32>, SensorError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(SensorError::Label(format!(
                    "cannot read {}: {e}",
                    self.path.display()
                )));
            }
        };
        let name = text.trim();
        if name.is_empty() {
            return Ok(None);
        }
        self.classes.require(name).map(Some)
    }
}

/// Waits for the next sampling instant.
pub trait Pacer {
    fn wait_tick(&mut self);
}

/// Ticks every `period` against the clock, without drift: each deadline
/// is the previous one plus the period. After a stall longer than a
/// period the schedule restarts from now (missed ticks are not made up
/// in a burst).
#[derive(Debug)]
pub struct FixedRate {
    period: Duration,
    next: Option<Instant>,
    /// Ticks that came late by more than a period.
    pub overruns: u64,
}

impl FixedRate {
    pub fn new(period: Duration) -> Self {
        FixedRate {
            period,
            next: None,
            overruns: 0,
        }
    }
}

impl Pacer for FixedRate {
    fn wait_tick(&mut self) {
        let now = Instant::now();
        let deadline = *self.next.get_or_insert(now);
        if deadline > now {
            std::thread::sleep(deadline - now);
            self.next = Some(deadline + self.period);
        } else if now - deadline > self.period {
            self.overruns += 1;
            self.next = Some(now + self.period);
        } else {
            self.next = Some(deadline + self.period);
        }
    }
}

/// Sample one window. `Ok(None)`: the window was untagged or the tag
/// changed while it was sampled, so it was dropped.
pub fn collect_window<L: LabelSource + ?Sized>(
    imu: &mut impl Imu,
    labels: &mut L,
    spec: &WindowSpec,
    pacer: &mut impl Pacer,
) -> Result<Option<Window>, SensorError> {
    spec.validate()?;
    let start = labels.current()?;
    let mut samples = Vec::with_capacity(spec.samples);
    for _ in 0..spec.samples {
        pacer.wait_tick();
        let s = imu.read_sample()?;
        let mut row = [0f32; CHANNELS];
        row[..3].copy_from_slice(&s.accel_mps2);
        row[3..].copy_from_slice(&s.gyro_dps);
        samples.push(row);
    }
    let end = labels.current()?;
    Ok(match (start, end) {
        (Some(a), Some(b)) if a == b => Some(Window { label: a, samples }),
        _ => None,
    })
}

/// Windows as a data set: each sample is channels-first `[6, samples]`
/// (the `(C, L)` layout of a PyTorch `Conv1d`), scaled by
/// [`ACCEL_SCALE_MPS2`] and [`GYRO_SCALE_DPS`]; `classes` is
/// `classes` if given, else one more than the largest label.
pub fn to_dataset(windows: &[Window], classes: Option<usize>) -> Result<Dataset, DataError> {
    let n = windows.first().map_or(0, |w| w.samples.len());
    if windows.iter().any(|w| w.samples.len() != n) {
        return Err(DataError::Invalid(
            "windows of different lengths cannot form one data set".into(),
        ));
    }
    let max_label = windows.iter().map(|w| w.label as usize + 1).max();
    let classes = classes.unwrap_or(max_label.unwrap_or(0));
    if max_label.is_some_and(|m| m > classes) {
        return Err(DataError::Invalid(format!(
            "a window is labelled {}, past the {classes} classes",
            max_label.unwrap_or(0) - 1
        )));
    }
    let mut feats = Vec::with_capacity(windows.len() * n * CHANNELS);
    for w in windows {
        for c in 0..CHANNELS {
            let scale = if c < 3 {
                ACCEL_SCALE_MPS2
            } else {
                GYRO_SCALE_DPS
            };
            feats.extend(w.samples.iter().map(|s| s[c] / scale));
        }
    }
    Ok(Dataset {
        features: Features::F32(feats),
        sample_shape: vec![CHANNELS, n],
        labels: windows.iter().map(|w| i64::from(w.label)).collect(),
        classes,
    })
}

/// Every readable window in the sample store in `dir`, oldest first, as a
/// data set (records that fail their checksum were already skipped by
/// the store; records that are not windows are skipped here).
pub fn load_store(dir: &Path) -> Result<Dataset, DataError> {
    let bad = |reason: String| DataError::Format {
        path: dir.to_path_buf(),
        reason,
    };
    let store = SampleStore::open(dir).map_err(|e| bad(e.to_string()))?;
    if samples_for_record_bytes(store.record_bytes()).is_none() {
        return Err(bad(format!(
            "records of {} bytes are not IMU windows",
            store.record_bytes()
        )));
    }
    let mut windows = Vec::with_capacity(store.len());
    for rec in store.iter() {
        let (_, bytes) = rec.map_err(|e| bad(e.to_string()))?;
        if let Some(w) = Window::decode(&bytes) {
            windows.push(w);
        }
    }
    if windows.is_empty() {
        return Err(bad(
            "the sample store holds no windows yet: run `fedge-device collect` first".into(),
        ));
    }
    to_dataset(&windows, None)
}
