//! Fuzzing entry points for what the device reads back from its own
//! disk (a torn write or a foreign file must be refused, not trusted):
//! the error-feedback residual state and (feature `engine`) the sensor
//! window records of the sample store. Shared by the cargo-fuzz targets
//! in `fuzz/` and the corpus replay test (`tests/fuzz_corpus.rs`); see
//! [`fedge_proto::fuzzing`] for the conventions.

use fedge_proto::codec::CodecSpec;
use fedge_proto::fuzzing::Target;

use crate::compress::Compressor;

/// The device crate's fuzz targets.
pub const TARGETS: &[Target] = &[
    Target {
        name: "residual",
        run: residual,
        seeds: residual_seeds,
    },
    #[cfg(feature = "engine")]
    Target {
        name: "sensor_window",
        run: sensor_window,
        seeds: sensor_window_seeds,
    },
];

/// [`Compressor::from_bytes`]: an accepted residual is finite, has the
/// declared length, and saves to bytes that load back to it.
pub fn residual(data: &[u8]) {
    let Ok(c) = Compressor::from_bytes(data) else {
        return;
    };
    assert!(c.residual().iter().all(|v| v.is_finite()));
    assert_eq!(8 + 4 * c.residual().len(), data.len());
    let bytes = c.to_bytes();
    assert_eq!(bytes.len(), data.len());
    let back = Compressor::from_bytes(&bytes).expect("own bytes load");
    assert_eq!(back.residual(), c.residual());
}

fn residual_seeds() -> Vec<Vec<u8>> {
    let spec = CodecSpec::parse("topk:0.25+q4").expect("seed spec");
    let mut out = vec![Compressor::default().to_bytes()];
    let mut c = Compressor::default();
    let delta: Vec<f32> = (0..12).map(|i| (i as f32 * 0.9).cos()).collect();
    c.compress(&spec, &delta, 3, true).expect("finite delta");
    out.push(c.to_bytes());
    out
}

/// [`crate::sensor::window::Window::decode`]: an accepted record is a
/// window of finite samples that encodes back to the same bytes.
#[cfg(feature = "engine")]
pub fn sensor_window(data: &[u8]) {
    use crate::sensor::window::{Window, record_bytes};
    let Some(w) = Window::decode(data) else {
        return;
    };
    assert!(!w.samples.is_empty());
    assert!(w.samples.iter().flatten().all(|v| v.is_finite()));
    assert_eq!(record_bytes(w.samples.len()), data.len());
    assert_eq!(w.encode(), data);
}

#[cfg(feature = "engine")]
fn sensor_window_seeds() -> Vec<Vec<u8>> {
    use crate::sensor::window::Window;
    [1usize, 4]
        .iter()
        .map(|&n| {
            Window {
                label: n as u32,
                samples: (0..n)
                    .map(|i| {
                        let a = i as f32 * 0.1;
                        [a, -a, 9.81, 0.5, -0.5, 100.0]
                    })
                    .collect(),
            }
            .encode()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_pass_their_targets() {
        for t in TARGETS {
            for s in (t.seeds)() {
                (t.run)(&s);
            }
            (t.run)(&[]);
        }
    }
}
