//! Small helpers over tract-onnx's protobuf types: reading attributes and
//! tensors, and making nodes, attributes, tensors and value infos.

use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::tensor_shape_proto::{Dimension, dimension};
use tract_onnx::pb::type_proto::{Tensor as TypeTensor, Value as TypeValue};
use tract_onnx::pb::{
    AttributeProto, NodeProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

use super::TrainError;

/// tract-onnx's ONNX protobuf types, which these helpers make and read: for
/// building models in tests and tools without depending on tract directly.
pub use tract_onnx::pb;

pub const F32: i32 = DataType::Float as i32;
pub const I64: i32 = DataType::Int64 as i32;
pub const BOOL: i32 = DataType::Bool as i32;

pub fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

pub fn attr_i(node: &NodeProto, name: &str) -> Option<i64> {
    attr(node, name).map(|a| a.i)
}

pub fn attr_f(node: &NodeProto, name: &str) -> Option<f32> {
    attr(node, name).map(|a| a.f)
}

pub fn attr_ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(node, name).map(|a| a.ints.clone())
}

pub fn attr_s(node: &NodeProto, name: &str) -> Option<String> {
    attr(node, name).map(|a| String::from_utf8_lossy(&a.s).into_owned())
}

pub fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

pub fn float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Float as i32,
        f: v,
        ..Default::default()
    }
}

pub fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}

pub fn string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::String as i32,
        s: v.as_bytes().to_vec(),
        ..Default::default()
    }
}

pub fn node(
    op: &str,
    name: &str,
    inputs: &[&str],
    outputs: &[&str],
    attrs: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: name.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

pub fn tensor_f32(name: &str, dims: &[usize], data: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: F32,
        raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

pub fn tensor_i64(name: &str, dims: &[usize], data: &[i64]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: I64,
        raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

pub fn dims(t: &TensorProto) -> Result<Vec<usize>, TrainError> {
    t.dims
        .iter()
        .map(|&d| {
            usize::try_from(d)
                .map_err(|_| TrainError::BadModel(format!("tensor `{}` has dim {d}", t.name)))
        })
        .collect()
}

fn numel(t: &TensorProto) -> Result<usize, TrainError> {
    dims(t)?
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| {
            TrainError::BadModel(format!("tensor `{}` has more elements than usize", t.name))
        })
}

/// Values of a float tensor (raw or typed storage).
pub fn f32_values(t: &TensorProto) -> Result<Vec<f32>, TrainError> {
    if t.data_type != F32 {
        return Err(TrainError::BadModel(format!(
            "tensor `{}` is not float32",
            t.name
        )));
    }
    let n = numel(t)?;
    let v: Vec<f32> = if !t.raw_data.is_empty() {
        t.raw_data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect()
    } else {
        t.float_data.clone()
    };
    if v.len() != n {
        return Err(TrainError::BadModel(format!(
            "tensor `{}` holds {} values for {n} elements (external data is not supported)",
            t.name,
            v.len()
        )));
    }
    Ok(v)
}

/// Values of an int64 tensor (raw or typed storage).
pub fn i64_values(t: &TensorProto) -> Result<Vec<i64>, TrainError> {
    if t.data_type != I64 {
        return Err(TrainError::BadModel(format!(
            "tensor `{}` is not int64",
            t.name
        )));
    }
    let n = numel(t)?;
    let v: Vec<i64> = if !t.raw_data.is_empty() {
        t.raw_data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect()
    } else {
        t.int64_data.clone()
    };
    if v.len() != n {
        return Err(TrainError::BadModel(format!(
            "tensor `{}` holds {} values for {n} elements",
            t.name,
            v.len()
        )));
    }
    Ok(v)
}

/// Values of a bool tensor (raw bytes or `int32_data`).
pub fn bool_values(t: &TensorProto) -> Result<Vec<bool>, TrainError> {
    if t.data_type != BOOL {
        return Err(TrainError::BadModel(format!(
            "tensor `{}` is not bool",
            t.name
        )));
    }
    let n = numel(t)?;
    let v: Vec<bool> = if !t.raw_data.is_empty() {
        t.raw_data.iter().map(|&b| b != 0).collect()
    } else {
        t.int32_data.iter().map(|&b| b != 0).collect()
    };
    if v.len() != n {
        return Err(TrainError::BadModel(format!(
            "tensor `{}` holds {} values for {n} elements",
            t.name,
            v.len()
        )));
    }
    Ok(v)
}

pub fn tensor_bool(name: &str, dims: &[usize], data: &[bool]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: BOOL,
        raw_data: data.iter().map(|&b| b as u8).collect(),
        ..Default::default()
    }
}

pub fn value_info(name: &str, elem_type: i32, shape: &[usize]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(TypeValue::TensorType(TypeTensor {
                elem_type,
                shape: Some(TensorShapeProto {
                    dim: shape
                        .iter()
                        .map(|&d| Dimension {
                            value: Some(dimension::Value::DimValue(d as i64)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Element type and shape of a value info; symbolic dims become `None`.
pub fn value_info_shape(v: &ValueInfoProto) -> Option<(i32, Vec<Option<usize>>)> {
    let TypeValue::TensorType(t) = v.r#type.as_ref()?.value.as_ref()?;
    let shape = t
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(dimension::Value::DimValue(v)) if v > 0 => Some(v as usize),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Some((t.elem_type, shape))
}
