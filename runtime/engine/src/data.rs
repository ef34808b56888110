//! Local data: IDX files (MNIST) and plain text (Shakespeare), as datasets
//! of fixed-shape samples with integer labels.

use std::io::Read;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{0}")]
    Invalid(String),
}

/// Sample features, flat, `len * sample_numel` values.
#[derive(Clone, Debug, PartialEq)]
pub enum Features {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub features: Features,
    pub sample_shape: Vec<usize>,
    pub labels: Vec<i64>,
    pub classes: usize,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn sample_numel(&self) -> usize {
        self.sample_shape.iter().product()
    }

    /// The samples at `idx`, in that order.
    pub fn subset(&self, idx: &[usize]) -> Dataset {
        let k = self.sample_numel();
        let features = match &self.features {
            Features::F32(v) => Features::F32(
                idx.iter()
                    .flat_map(|&i| v[i * k..(i + 1) * k].iter().copied())
                    .collect(),
            ),
            Features::I64(v) => Features::I64(
                idx.iter()
                    .flat_map(|&i| v[i * k..(i + 1) * k].iter().copied())
                    .collect(),
            ),
        };
        Dataset {
            features,
            sample_shape: self.sample_shape.clone(),
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
            classes: self.classes,
        }
    }

    /// The samples of `parts`, one after another (same shape and classes).
    pub fn concat(parts: &[Dataset]) -> Result<Dataset, DataError> {
        let Some(first) = parts.first() else {
            return Err(DataError::Invalid("nothing to concatenate".into()));
        };
        let mut out = Dataset {
            features: match first.features {
                Features::F32(_) => Features::F32(Vec::new()),
                Features::I64(_) => Features::I64(Vec::new()),
            },
            sample_shape: first.sample_shape.clone(),
            labels: Vec::new(),
            classes: first.classes,
        };
        for p in parts {
            if p.sample_shape != out.sample_shape || p.classes != out.classes {
                return Err(DataError::Invalid(format!(
                    "cannot concatenate samples of shape {:?} ({} classes) with {:?} ({} classes)",
                    p.sample_shape, p.classes, out.sample_shape, out.classes
                )));
            }
            match (&mut out.features, &p.features) {
                (Features::F32(a), Features::F32(b)) => a.extend_from_slice(b),
                (Features::I64(a), Features::I64(b)) => a.extend_from_slice(b),
                _ => {
                    return Err(DataError::Invalid(
                        "cannot concatenate f32 and i64 samples".into(),
                    ));
                }
            }
            out.labels.extend_from_slice(&p.labels);
        }
        Ok(out)
    }

    /// Samples `range`.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Dataset {
        self.subset(&range.collect::<Vec<_>>())
    }

    /// Shuffled batch index lists for one epoch; the last partial batch is
    /// dropped (the step graph has a fixed batch size). A data set smaller
    /// than one batch (a device with few samples) gives one batch that
    /// repeats its samples.
    pub fn epoch_batches(&self, batch: usize, seed: u64) -> Vec<Vec<usize>> {
        let mut idx: Vec<usize> = (0..self.len()).collect();
        idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        if !idx.is_empty() && idx.len() < batch {
            return vec![idx.iter().copied().cycle().take(batch).collect()];
        }
        idx.chunks_exact(batch).map(|c| c.to_vec()).collect()
    }

    /// Gather a batch's features and labels into the given buffers.
    pub fn gather(&self, idx: &[usize], xf: &mut Vec<f32>, xi: &mut Vec<i64>, y: &mut Vec<i64>) {
        let k = self.sample_numel();
        xf.clear();
        xi.clear();
        y.clear();
        for &i in idx {
            match &self.features {
                Features::F32(v) => xf.extend_from_slice(&v[i * k..(i + 1) * k]),
                Features::I64(v) => xi.extend_from_slice(&v[i * k..(i + 1) * k]),
            }
            y.push(self.labels[i]);
        }
    }

    /// Count of each label.
    pub fn label_counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.classes];
        for &l in &self.labels {
            c[l as usize] += 1;
        }
        c
    }
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = std::fs::read(path).map_err(|source| DataError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::Format {
                path: path.to_path_buf(),
                reason: format!("bad gzip: {e}"),
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parse an IDX file of unsigned bytes: (dims, data).
pub fn parse_idx(path: &Path, bytes: &[u8]) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let bad = |reason: String| DataError::Format {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad("not an IDX file".into()));
    }
    if bytes[2] != 0x08 {
        return Err(bad(format!(
            "IDX type 0x{:02x} is not unsigned bytes",
            bytes[2]
        )));
    }
    let rank = bytes[3] as usize;
    if rank == 0 || rank > 4 || bytes.len() < 4 + 4 * rank {
        return Err(bad(format!("bad IDX rank {rank}")));
    }
    let dims: Vec<usize> = (0..rank)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4")) as usize)
        .collect();
    let n = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("size overflows".into()))?;
    let data = &bytes[4 + 4 * rank..];
    if data.len() != n {
        return Err(bad(format!(
            "header declares {n} values, file has {}",
            data.len()
        )));
    }
    Ok((dims, data.to_vec()))
}

/// MNIST-style images and labels (IDX, optionally gzipped), pixels scaled
/// to [0, 1], each sample shaped `[1, rows, cols]`.
pub fn load_idx_images(images: &Path, labels: &Path) -> Result<Dataset, DataError> {
    let (idims, pixels) = parse_idx(images, &read_maybe_gz(images)?)?;
    let (ldims, lab) = parse_idx(labels, &read_maybe_gz(labels)?)?;
    if idims.len() != 3 || ldims.len() != 1 || idims[0] != ldims[0] {
        return Err(DataError::Invalid(format!(
            "images {idims:?} and labels {ldims:?} do not match"
        )));
    }
    let classes = lab.iter().copied().max().map_or(0, |m| m as usize + 1);
    Ok(Dataset {
        features: Features::F32(pixels.iter().map(|&p| f32::from(p) / 255.0).collect()),
        sample_shape: vec![1, idims[1], idims[2]],
        labels: lab.iter().map(|&l| i64::from(l)).collect(),
        classes,
    })
}

/// The repository's data directory (`models/data`), for tools and tests.
pub fn shipped_data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/data")
}

/// The shipped 10,000 MNIST digits.
pub fn load_mnist(dir: &Path) -> Result<Dataset, DataError> {
    let d = dir.join("mnist-10k");
    load_idx_images(
        &d.join("images-idx3-ubyte.gz"),
        &d.join("labels-idx1-ubyte.gz"),
    )
}

/// Characters of a text, sorted: the vocabulary of the character model.
#[derive(Clone, Debug, PartialEq)]
pub struct Vocab {
    pub chars: Vec<char>,
}

impl Vocab {
    pub fn of(text: &str) -> Vocab {
        let mut chars: Vec<char> = text
            .chars()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        chars.sort_unstable();
        Vocab { chars }
    }

    pub fn len(&self) -> usize {
        self.chars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chars.is_empty()
    }

    pub fn index(&self, c: char) -> Option<i64> {
        self.chars.binary_search(&c).ok().map(|i| i as i64)
    }
}

/// Next-character samples: each sample is `context` character indices, its
/// label the character after them. Windows start every `stride` characters.
pub fn char_windows(
    text: &str,
    vocab: &Vocab,
    context: usize,
    stride: usize,
) -> Result<Dataset, DataError> {
    let ids: Vec<i64> = text
        .chars()
        .map(|c| {
            vocab.index(c).ok_or_else(|| {
                DataError::Invalid(format!("character {c:?} is not in the vocabulary"))
            })
        })
        .collect::<Result<_, _>>()?;
    if stride == 0 || context == 0 {
        return Err(DataError::Invalid(
            "context and stride must be positive".into(),
        ));
    }
    let mut feats = Vec::new();
    let mut labels = Vec::new();
    let mut start = 0;
    while start + context < ids.len() {
        feats.extend_from_slice(&ids[start..start + context]);
        labels.push(ids[start + context]);
        start += stride;
    }
    Ok(Dataset {
        features: Features::I64(feats),
        sample_shape: vec![context],
        labels,
        classes: vocab.len(),
    })
}

/// The shipped Shakespeare text.
pub fn load_text(path: &Path) -> Result<String, DataError> {
    std::fs::read_to_string(path).map_err(|source| DataError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Speeches grouped by speaking role, roles in order of first appearance.
/// In the shipped play text a speech is a line `NAME:` at the start of a
/// paragraph (after a blank line, or first in the text), then its lines up
/// to the next blank line. A role's text is its speeches joined by newlines.
pub fn speeches_by_role(text: &str) -> Vec<(String, String)> {
    let mut order: Vec<String> = Vec::new();
    let mut by_role: std::collections::HashMap<String, String> = Default::default();
    for para in text.split("\n\n") {
        let para = para.trim_matches('\n');
        let Some((head, body)) = para.split_once('\n') else {
            continue;
        };
        let Some(name) = head.strip_suffix(':') else {
            continue;
        };
        if name.is_empty() || name.contains(':') || body.trim().is_empty() {
            continue;
        }
        let t = by_role.entry(name.to_string()).or_insert_with(|| {
            order.push(name.to_string());
            String::new()
        });
        t.push_str(body);
        t.push('\n');
    }
    order
        .into_iter()
        .map(|r| {
            let t = by_role.remove(&r).expect("every role has text");
            (r, t)
        })
        .collect()
}

/// A federated split of a play "one device per speaking role" (LEAF's
/// Shakespeare): the `devices` roles with the most text, each role's
/// windows split into its training part and a held-out tail.
#[derive(Clone, Debug)]
pub struct RoleSplit {
    pub roles: Vec<String>,
    /// Every device's training windows, concatenated; `shards[i]` indexes
    /// device i's.
    pub train: Dataset,
    pub shards: Vec<Vec<usize>>,
    /// The held-out tails of every role, concatenated.
    pub test: Dataset,
}

/// Split `text` by role: the `devices` roles with the most text; windows
/// of `context` characters every `stride` over each role's own text (no
/// window crosses roles); the last `held_out` fraction of each role's
/// windows is held out; at most `max_per_role` training windows per role
/// (0: no cap), the earliest kept.
pub fn split_by_role(
    text: &str,
    vocab: &Vocab,
    context: usize,
    stride: usize,
    devices: usize,
    held_out: f64,
    max_per_role: usize,
) -> Result<RoleSplit, DataError> {
    if !(0.0..1.0).contains(&held_out) {
        return Err(DataError::Invalid(format!(
            "held-out fraction must be in [0, 1), got {held_out}"
        )));
    }
    let mut roles = speeches_by_role(text);
    // Most text first; ties by name, so the choice is deterministic.
    roles.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then_with(|| a.0.cmp(&b.0)));
    let min_chars = 4 * (context + 1);
    let usable = roles.iter().filter(|(_, t)| t.len() >= min_chars).count();
    if usable < devices {
        return Err(DataError::Invalid(format!(
            "{devices} devices asked for, but only {usable} roles speak at least {min_chars} characters"
        )));
    }
    roles.truncate(devices);
    let mut train_parts = Vec::with_capacity(devices);
    let mut test_parts = Vec::with_capacity(devices);
    for (_, t) in &roles {
        let w = char_windows(t, vocab, context, stride)?;
        let n_test = ((w.len() as f64 * held_out).ceil() as usize).min(w.len() - 1);
        let n_train = w.len() - n_test;
        let keep = if max_per_role == 0 {
            n_train
        } else {
            n_train.min(max_per_role)
        };
        train_parts.push(w.slice(0..keep));
        test_parts.push(w.slice(n_train..w.len()));
    }
    let mut shards = Vec::with_capacity(devices);
    let mut start = 0;
    for p in &train_parts {
        shards.push((start..start + p.len()).collect());
        start += p.len();
    }
    Ok(RoleSplit {
        roles: roles.into_iter().map(|(r, _)| r).collect(),
        train: Dataset::concat(&train_parts)?,
        shards,
        test: Dataset::concat(&test_parts)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speeches_group_by_role_and_windows_stay_inside_a_role() {
        let text = "A:\nab cd\n\nB:\nxy\nzw\n\nA:\nef gh\n\nnot a speech\n\nC:\n\n";
        let roles = speeches_by_role(text);
        assert_eq!(
            roles,
            vec![
                ("A".to_string(), "ab cd\nef gh\n".to_string()),
                ("B".to_string(), "xy\nzw\n".to_string()),
            ]
        );
        let long: String = (0..40)
            .map(|i| format!("R{}:\n{}\n\n", i % 3, "abcdefgh".repeat(i % 3 + 1)))
            .collect();
        let vocab = Vocab::of(&long);
        let split = split_by_role(&long, &vocab, 4, 2, 3, 0.25, 0).unwrap();
        // Most text first: R2 speaks 24 characters a speech, R0 8.
        assert_eq!(split.roles, vec!["R2", "R1", "R0"]);
        assert_eq!(split.shards.len(), 3);
        let total: usize = split.shards.iter().map(Vec::len).sum();
        assert_eq!(total, split.train.len());
        // Device 2 (R0) only ever sees R0's characters (no `R`, `1`, `2`).
        let Features::I64(f) = &split.train.features else {
            panic!("char windows are i64")
        };
        let r0_text: std::collections::HashSet<i64> = "abcdefgh\n"
            .chars()
            .map(|c| vocab.index(c).unwrap())
            .collect();
        for &i in &split.shards[2] {
            assert!(f[i * 4..i * 4 + 4].iter().all(|c| r0_text.contains(c)));
        }
        assert!(!split.test.is_empty());
        let err = split_by_role(&long, &vocab, 4, 2, 4, 0.25, 0).unwrap_err();
        assert!(err.to_string().contains("only 3 roles"), "{err}");
    }

    #[test]
    fn shipped_play_has_enough_roles_for_fifty_devices() {
        let text = load_text(&shipped_data_dir().join("tinyshakespeare/input.txt")).unwrap();
        let vocab = Vocab::of(&text);
        let split = split_by_role(&text, &vocab, 32, 7, 50, 0.1, 300).unwrap();
        assert_eq!(split.roles.len(), 50);
        assert!(split.shards.iter().all(|s| !s.is_empty() && s.len() <= 300));
        assert!(split.test.len() > 1000, "{}", split.test.len());
    }

    #[test]
    fn shipped_mnist_loads_and_is_balanced() {
        let d = load_mnist(&shipped_data_dir()).unwrap();
        assert_eq!(d.len(), 10_000);
        assert_eq!(d.sample_shape, vec![1, 28, 28]);
        assert_eq!(d.classes, 10);
        assert_eq!(
            d.label_counts(),
            vec![1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
        );
        let Features::F32(v) = &d.features else {
            panic!()
        };
        assert!(v.iter().all(|p| (0.0..=1.0).contains(p)));
    }

    #[test]
    fn bad_idx_files_are_typed_errors() {
        let p = Path::new("x");
        assert!(parse_idx(p, b"\x00\x00\x08\x01\x00\x00\x00\x05abc").is_err());
        assert!(parse_idx(p, b"\x00\x00\x0d\x01\x00\x00\x00\x01a").is_err());
        assert!(parse_idx(p, b"PK").is_err());
        assert_eq!(
            parse_idx(p, b"\x00\x00\x08\x01\x00\x00\x00\x02ab").unwrap(),
            (vec![2], b"ab".to_vec())
        );
        assert!(matches!(
            load_idx_images(Path::new("/no/such/file"), Path::new("/no")),
            Err(DataError::Read { .. })
        ));
    }

    #[test]
    fn small_local_data_still_fills_a_batch() {
        let v = Vocab::of("abcab");
        let d = char_windows("abcab", &v, 2, 1).unwrap();
        let b = d.epoch_batches(8, 1);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].len(), 8);
        assert!(b[0].iter().all(|&i| i < 3));
        assert_eq!(
            d.slice(0..3).epoch_batches(2, 1).len(),
            1,
            "partial batches dropped"
        );
    }

    #[test]
    fn char_windows_predict_the_next_character() {
        let v = Vocab::of("abcab");
        let d = char_windows("abcab", &v, 2, 1).unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(d.features, Features::I64(vec![0, 1, 1, 2, 2, 0]));
        assert_eq!(d.labels, vec![2, 0, 1]);
    }
}

/// How a data set is split across devices.
#[derive(Clone, Debug, PartialEq)]
pub enum Partition {
    /// Shuffled, equal shares.
    Iid,
    /// Per class, device shares ~ Dirichlet(alpha) (smaller: more skewed).
    Dirichlet(f64),
    /// Sort by label, cut into `devices x shards` shards, deal each device
    /// `shards` of them (McMahan et al.'s pathological non-IID).
    Shards(usize),
}

impl Partition {
    pub fn parse(s: &str) -> Result<Self, DataError> {
        let bad = || {
            DataError::Invalid(format!(
                "partition `{s}`: use iid, dirichlet:ALPHA or shards:N"
            ))
        };
        match s.split_once(':') {
            None if s == "iid" => Ok(Partition::Iid),
            Some(("dirichlet", a)) => {
                let a: f64 = a.parse().map_err(|_| bad())?;
                if !(a > 0.0 && a.is_finite()) {
                    return Err(bad());
                }
                Ok(Partition::Dirichlet(a))
            }
            Some(("shards", n)) => Ok(Partition::Shards(
                n.parse().ok().filter(|n| *n > 0).ok_or_else(bad)?,
            )),
            _ => Err(bad()),
        }
    }

    /// Sample indices of each of `devices` devices (each non-empty when
    /// there are enough samples), deterministic for `seed`.
    pub fn split(&self, data: &Dataset, devices: usize, seed: u64) -> Vec<Vec<usize>> {
        use rand_distr::{Distribution, Gamma};
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut out = vec![Vec::new(); devices];
        if devices == 0 {
            return out;
        }
        match self {
            Partition::Iid => {
                let mut idx: Vec<usize> = (0..data.len()).collect();
                idx.shuffle(&mut rng);
                for (i, s) in idx.into_iter().enumerate() {
                    out[i % devices].push(s);
                }
            }
            Partition::Dirichlet(alpha) => {
                let gamma = Gamma::new(*alpha, 1.0).expect("alpha > 0");
                for class in 0..data.classes as i64 {
                    let mut idx: Vec<usize> = (0..data.len())
                        .filter(|&i| data.labels[i] == class)
                        .collect();
                    idx.shuffle(&mut rng);
                    let w: Vec<f64> = (0..devices)
                        .map(|_| gamma.sample(&mut rng).max(1e-12))
                        .collect();
                    let total: f64 = w.iter().sum();
                    let mut start = 0usize;
                    let mut acc = 0.0;
                    for (d, wd) in w.iter().enumerate() {
                        acc += wd / total;
                        let end = if d + 1 == devices {
                            idx.len()
                        } else {
                            (acc * idx.len() as f64).round() as usize
                        };
                        out[d].extend_from_slice(&idx[start..end.max(start)]);
                        start = end.max(start);
                    }
                }
                // No device left empty: give it a few random samples.
                for d in 0..devices {
                    if out[d].is_empty() {
                        let donor = (0..devices).max_by_key(|&j| out[j].len()).expect("devices");
                        let take = out[donor].len() / 10;
                        let split_at = out[donor].len() - take.max(1);
                        let moved: Vec<usize> = out[donor].split_off(split_at);
                        out[d] = moved;
                    }
                }
                for o in &mut out {
                    o.shuffle(&mut rng);
                }
            }
            Partition::Shards(per) => {
                let mut idx: Vec<usize> = (0..data.len()).collect();
                idx.shuffle(&mut rng);
                idx.sort_by_key(|&i| data.labels[i]); // stable: shuffled within a class
                let n_shards = devices * per;
                let size = data.len() / n_shards.max(1);
                let mut shards: Vec<usize> = (0..n_shards).collect();
                shards.shuffle(&mut rng);
                for (k, s) in shards.into_iter().enumerate() {
                    out[k % devices].extend_from_slice(&idx[s * size..(s + 1) * size]);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod partition_tests {
    use super::*;

    fn toy(n: usize, classes: usize) -> Dataset {
        Dataset {
            features: Features::F32(vec![0.0; n]),
            sample_shape: vec![1],
            labels: (0..n).map(|i| (i % classes) as i64).collect(),
            classes,
        }
    }

    #[test]
    fn partitions_cover_every_sample_once_and_skew_as_asked() {
        let d = toy(1000, 10);
        for p in [
            Partition::Iid,
            Partition::Dirichlet(0.5),
            Partition::Shards(2),
        ] {
            let parts = p.split(&d, 20, 7);
            let mut all: Vec<usize> = parts.iter().flatten().copied().collect();
            all.sort_unstable();
            all.dedup();
            assert_eq!(all.len(), 1000, "{p:?} covers every sample once");
            assert!(parts.iter().all(|q| !q.is_empty()), "{p:?}");
            assert_eq!(parts, p.split(&d, 20, 7), "deterministic");
        }
        // Shards(2): each device sees at most 2-3 classes.
        for q in Partition::Shards(2).split(&d, 20, 1) {
            let mut c: Vec<i64> = q.iter().map(|&i| d.labels[i]).collect();
            c.sort_unstable();
            c.dedup();
            assert!(c.len() <= 3, "{c:?}");
        }
        // Dirichlet(0.1) is far more skewed than IID.
        let skew = |p: Partition| {
            p.split(&d, 10, 3)
                .iter()
                .map(|q| {
                    let mut counts = [0usize; 10];
                    for &i in q {
                        counts[d.labels[i] as usize] += 1;
                    }
                    *counts.iter().max().unwrap() as f64 / q.len() as f64
                })
                .sum::<f64>()
                / 10.0
        };
        assert!(skew(Partition::Dirichlet(0.1)) > 2.0 * skew(Partition::Iid));
        assert!(Partition::parse("dirichlet:0").is_err());
        assert_eq!(Partition::parse("shards:2").unwrap(), Partition::Shards(2));
    }
}
