//! Naming local data on the command line: `mnist[:DIR]`,
//! `shakespeare[:FILE]`, `idx:IMAGES,LABELS`, or `imu:STORE_DIR` (IMU
//! windows collected by `fedge-device collect`).

use std::path::PathBuf;

use fedge_engine::data::{self, DataError, Dataset};

#[derive(Clone, Debug, PartialEq)]
pub enum DataSpec {
    /// The shipped MNIST digits (or an IDX pair in a directory laid out the same way).
    Mnist(PathBuf),
    /// IDX images and labels files.
    Idx(PathBuf, PathBuf),
    /// Plain text for next-character prediction.
    Text(PathBuf),
    /// IMU windows in a sample store directory ([`crate::sensor::window`]).
    Imu(PathBuf),
}

impl DataSpec {
    pub fn parse(s: &str) -> Result<Self, DataError> {
        let (kind, arg) = match s.split_once(':') {
            Some((k, a)) => (k, Some(a)),
            None => (s, None),
        };
        match (kind, arg) {
            ("mnist", None) => Ok(DataSpec::Mnist(data::shipped_data_dir())),
            ("mnist", Some(d)) => Ok(DataSpec::Mnist(d.into())),
            ("shakespeare", None) => Ok(DataSpec::Text(
                data::shipped_data_dir().join("tinyshakespeare/input.txt"),
            )),
            ("shakespeare" | "text", Some(f)) => Ok(DataSpec::Text(f.into())),
            ("imu", Some(d)) => Ok(DataSpec::Imu(d.into())),
            ("idx", Some(pair)) => {
                let (i, l) = pair.split_once(',').ok_or_else(|| {
                    DataError::Invalid("idx data needs `idx:IMAGES,LABELS`".into())
                })?;
                Ok(DataSpec::Idx(i.into(), l.into()))
            }
            _ => Err(DataError::Invalid(format!(
                "unknown data `{s}`: use mnist[:DIR], shakespeare[:FILE], text:FILE, idx:IMAGES,LABELS or imu:STORE_DIR"
            ))),
        }
    }

    /// Load it. Text becomes next-character windows of `context`
    /// characters every `stride` characters, over the vocabulary of the
    /// whole text.
    pub fn load(&self, context: usize, stride: usize) -> Result<Dataset, DataError> {
        match self {
            DataSpec::Mnist(dir) => data::load_mnist(dir),
            DataSpec::Idx(i, l) => data::load_idx_images(i, l),
            DataSpec::Imu(dir) => crate::sensor::window::load_store(dir),
            DataSpec::Text(f) => {
                let text = data::load_text(f)?;
                let vocab = data::Vocab::of(&text);
                data::char_windows(&text, &vocab, context, stride)
            }
        }
    }
}

/// Parse `A..B` as a sample range.
pub fn parse_range(s: &str) -> Result<std::ops::Range<usize>, DataError> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| DataError::Invalid(format!("range `{s}`: expected START..END")))?;
    let a: usize = a
        .parse()
        .map_err(|_| DataError::Invalid(format!("range `{s}`: bad start")))?;
    let b: usize = b
        .parse()
        .map_err(|_| DataError::Invalid(format!("range `{s}`: bad end")))?;
    if a >= b {
        return Err(DataError::Invalid(format!("range `{s}` is empty")));
    }
    Ok(a..b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_or_explain() {
        assert!(matches!(DataSpec::parse("mnist"), Ok(DataSpec::Mnist(_))));
        assert!(matches!(
            DataSpec::parse("shakespeare"),
            Ok(DataSpec::Text(_))
        ));
        assert!(matches!(DataSpec::parse("idx:a,b"), Ok(DataSpec::Idx(..))));
        assert!(DataSpec::parse("idx:a").is_err());
        assert_eq!(
            DataSpec::parse("imu:/var/lib/fedge/samples").unwrap(),
            DataSpec::Imu("/var/lib/fedge/samples".into())
        );
        assert!(
            DataSpec::parse("cifar")
                .unwrap_err()
                .to_string()
                .contains("mnist")
        );
        assert_eq!(parse_range("10..20").unwrap(), 10..20);
        assert!(parse_range("20..10").is_err());
        assert!(parse_range("x").is_err());
    }
}
