//! Bounds on everything a peer can make us allocate or loop over.

/// Limits shared by both ends. Every one is checked at the boundary and
/// exceeding it is a typed [`crate::ProtoError`], never an allocation of a
/// peer-chosen size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame (one encoded envelope), in bytes.
    pub frame_bytes_max: u32,
    /// Largest chunk of a model download or update upload, in bytes.
    pub chunk_bytes_max: u32,
    /// Most chunks in one transfer.
    pub transfer_chunks_max: u32,
    /// Largest model blob, in bytes.
    pub model_bytes_max: u64,
    /// Most parameters in a model or an update.
    pub update_dimension_max: u64,
    /// Most tensors in a parameter layout.
    pub tensors_max: u32,
    /// Most metrics in an update manifest.
    pub metrics_max: u32,
    /// Longest string field, in bytes.
    pub string_bytes_max: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            frame_bytes_max: 2 << 20,
            chunk_bytes_max: 1 << 20,
            transfer_chunks_max: 4096,
            model_bytes_max: 1 << 30,
            update_dimension_max: 64 << 20,
            tensors_max: 4096,
            metrics_max: 64,
            string_bytes_max: 4096,
        }
    }
}

impl Limits {
    /// Check `value <= max` for the named limit.
    pub fn check(what: &'static str, value: u64, max: u64) -> Result<(), crate::ProtoError> {
        if value > max {
            Err(crate::ProtoError::LimitExceeded { what, value, max })
        } else {
            Ok(())
        }
    }
}
