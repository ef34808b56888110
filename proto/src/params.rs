//! The one canonical parameter layout shared by training, compression, the
//! wire format and aggregation, and content-addressed model versions.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;

use crate::{Limits, ProtoError, wire};

/// A model version: blake3 of the encoded [`ModelBlob`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelVersion(pub [u8; 32]);

impl ModelVersion {
    pub fn of(bytes: &[u8]) -> Self {
        ModelVersion(*blake3::hash(bytes).as_bytes())
    }

    pub fn from_slice(field: &'static str, b: &[u8]) -> Result<Self, ProtoError> {
        let arr: [u8; 32] = b.try_into().map_err(|_| ProtoError::BadLength {
            field,
            expected: 32,
            got: b.len(),
        })?;
        Ok(ModelVersion(arr))
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses what [`ModelVersion::to_hex`] writes (64 hex digits).
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 64 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(ModelVersion(out))
    }

    /// First 12 hex digits, for logs and tables.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }
}

impl fmt::Debug for ModelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModelVersion({})", self.short())
    }
}

impl fmt::Display for ModelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short())
    }
}

/// One named tensor of the layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, shape: &[usize]) -> Self {
        TensorSpec {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Tensors in their canonical order. Offsets into the flat value vector
/// follow this order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamLayout {
    tensors: Vec<TensorSpec>,
    offsets: Vec<usize>,
    dimension: usize,
}

impl ParamLayout {
    /// Build a layout; names must be unique and non-empty.
    pub fn new(tensors: Vec<TensorSpec>) -> Result<Self, ProtoError> {
        let mut seen = std::collections::HashSet::new();
        let mut offsets = Vec::with_capacity(tensors.len());
        let mut dimension = 0usize;
        for t in &tensors {
            if t.name.is_empty() {
                return Err(ProtoError::Invalid {
                    field: "tensor.name",
                    reason: "empty".into(),
                });
            }
            if !seen.insert(t.name.as_str()) {
                return Err(ProtoError::Invalid {
                    field: "tensor.name",
                    reason: format!("duplicate tensor `{}`", t.name),
                });
            }
            offsets.push(dimension);
            let n = t
                .shape
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .and_then(|n| dimension.checked_add(n))
                .ok_or(ProtoError::Invalid {
                    field: "tensor.shape",
                    reason: "element count overflows".into(),
                })?;
            dimension = n;
        }
        Ok(ParamLayout {
            tensors,
            offsets,
            dimension,
        })
    }

    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    /// Total number of parameters.
    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// Flat range of the tensor at `i`.
    pub fn range(&self, i: usize) -> std::ops::Range<usize> {
        self.offsets[i]..self.offsets[i] + self.tensors[i].numel()
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.tensors.iter().position(|t| t.name == name)
    }

    fn to_wire(&self) -> Vec<wire::TensorSpec> {
        self.tensors
            .iter()
            .map(|t| wire::TensorSpec {
                name: t.name.clone(),
                shape: t.shape.iter().map(|&d| d as u64).collect(),
            })
            .collect()
    }

    fn from_wire(specs: Vec<wire::TensorSpec>, limits: &Limits) -> Result<Self, ProtoError> {
        Limits::check(
            "tensor count",
            specs.len() as u64,
            limits.tensors_max.into(),
        )?;
        let mut tensors = Vec::with_capacity(specs.len());
        for s in specs {
            Limits::check(
                "tensor name length",
                s.name.len() as u64,
                limits.string_bytes_max.into(),
            )?;
            Limits::check("tensor rank", s.shape.len() as u64, 8)?;
            let mut shape = Vec::with_capacity(s.shape.len());
            for d in s.shape {
                Limits::check("tensor dim", d, limits.update_dimension_max)?;
                shape.push(d as usize);
            }
            tensors.push(TensorSpec {
                name: s.name,
                shape,
            });
        }
        let layout = ParamLayout::new(tensors)?;
        Limits::check(
            "parameter count",
            layout.dimension as u64,
            limits.update_dimension_max,
        )?;
        Ok(layout)
    }
}

/// Parameter values in the canonical layout.
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    pub layout: Arc<ParamLayout>,
    pub values: Vec<f32>,
}

impl Params {
    pub fn new(layout: Arc<ParamLayout>, values: Vec<f32>) -> Result<Self, ProtoError> {
        if values.len() != layout.dimension() {
            return Err(ProtoError::DimensionMismatch {
                expected: layout.dimension() as u64,
                got: values.len() as u64,
            });
        }
        Ok(Params { layout, values })
    }

    pub fn zeros(layout: Arc<ParamLayout>) -> Self {
        let values = vec![0.0; layout.dimension()];
        Params { layout, values }
    }

    pub fn tensor(&self, name: &str) -> Option<&[f32]> {
        let i = self.layout.index_of(name)?;
        Some(&self.values[self.layout.range(i)])
    }
}

/// What a device downloads: the ONNX graph (may be empty) and the parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelBlob {
    pub onnx_graph: Bytes,
    pub params: Params,
}

impl ModelBlob {
    /// Canonical encoding; the model version is the hash of these bytes.
    pub fn encode(&self) -> Bytes {
        let mut data = Vec::with_capacity(self.params.values.len() * 4);
        for v in &self.params.values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        let w = wire::ModelBlob {
            onnx_graph: self.onnx_graph.clone(),
            params: Some(wire::ParamSet {
                tensors: self.params.layout.to_wire(),
                data_f32le: data.into(),
            }),
        };
        w.encode_to_vec().into()
    }

    pub fn version(&self) -> ModelVersion {
        ModelVersion::of(&self.encode())
    }

    /// Decode and validate a model blob. Non-finite parameters are refused.
    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Self, ProtoError> {
        Limits::check("model bytes", bytes.len() as u64, limits.model_bytes_max)?;
        let w = wire::ModelBlob::decode(bytes)?;
        let ps = w.params.ok_or(ProtoError::MissingField("model.params"))?;
        let layout = Arc::new(ParamLayout::from_wire(ps.tensors, limits)?);
        let values = decode_f32le(&ps.data_f32le, layout.dimension())?;
        Ok(ModelBlob {
            onnx_graph: w.onnx_graph,
            params: Params { layout, values },
        })
    }
}

/// Decode exactly `dimension` finite little-endian f32 values.
pub fn decode_f32le(data: &[u8], dimension: usize) -> Result<Vec<f32>, ProtoError> {
    if data.len() != dimension * 4 {
        return Err(ProtoError::DimensionMismatch {
            expected: dimension as u64,
            got: (data.len() / 4) as u64,
        });
    }
    let mut out = Vec::with_capacity(dimension);
    for (i, c) in data.chunks_exact(4).enumerate() {
        let v = f32::from_le_bytes(c.try_into().expect("4 bytes"));
        if !v.is_finite() {
            return Err(ProtoError::NonFinite { index: i as u64 });
        }
        out.push(v);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_versions_round_trip_through_hex() {
        let v = ModelVersion(std::array::from_fn(|i| (i * 37) as u8));
        assert_eq!(ModelVersion::from_hex(&v.to_hex()), Some(v));
        assert_eq!(ModelVersion::from_hex("ab"), None);
        assert_eq!(ModelVersion::from_hex(&"zz".repeat(32)), None);
        assert_eq!(ModelVersion::from_hex(&"é".repeat(32)), None);
    }

    fn blob() -> ModelBlob {
        let layout = Arc::new(
            ParamLayout::new(vec![
                TensorSpec::new("w", &[2, 3]),
                TensorSpec::new("b", &[3]),
            ])
            .unwrap(),
        );
        let values = (0..9).map(|i| i as f32 * 0.5).collect();
        ModelBlob {
            onnx_graph: Bytes::from_static(b"graph"),
            params: Params::new(layout, values).unwrap(),
        }
    }

    #[test]
    fn blob_round_trips_and_version_is_content_hash() {
        let b = blob();
        let bytes = b.encode();
        let back = ModelBlob::decode(&bytes, &Limits::default()).unwrap();
        assert_eq!(back, b);
        assert_eq!(back.version(), ModelVersion::of(&bytes));
        let mut other = b.clone();
        other.params.values[0] = 9.0;
        assert_ne!(other.version(), b.version());
        assert_eq!(b.params.tensor("b").unwrap(), &[3.0, 3.5, 4.0]);
    }

    #[test]
    fn bad_blobs_are_typed_errors() {
        let l = Limits::default();
        assert!(matches!(
            ModelBlob::decode(&[0xff, 0xff, 0xff], &l),
            Err(ProtoError::Malformed(_))
        ));
        let mut w = wire::ModelBlob::decode(&*blob().encode()).unwrap();
        w.params.as_mut().unwrap().data_f32le = vec![0u8; 8].into();
        assert!(matches!(
            ModelBlob::decode(&w.encode_to_vec(), &l),
            Err(ProtoError::DimensionMismatch { .. })
        ));
        let mut data = vec![0u8; 36];
        data[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
        w.params.as_mut().unwrap().data_f32le = data.into();
        assert_eq!(
            ModelBlob::decode(&w.encode_to_vec(), &l),
            Err(ProtoError::NonFinite { index: 1 })
        );
        w.params.as_mut().unwrap().tensors[1].name = "w".into();
        assert!(matches!(
            ModelBlob::decode(&w.encode_to_vec(), &l),
            Err(ProtoError::Invalid { .. })
        ));
        let small = Limits {
            update_dimension_max: 4,
            ..Limits::default()
        };
        assert!(matches!(
            ModelBlob::decode(&blob().encode(), &small),
            Err(ProtoError::LimitExceeded { .. })
        ));
    }
}
