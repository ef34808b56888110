//! Making a signed, compressed update from the trained parameters.

use std::path::Path;

use fedge_device::compress::{Compressor, round_seed};
use fedge_proto::codec::CodecSpec;
use fedge_proto::sign::{SigningKey, UpdateManifest};
use prost::Message;

use super::{Loaded, SignedUpdate, io_error};
use crate::FedgeError;

impl Loaded {
    pub(super) fn make_update(
        &self,
        key: &SigningKey,
        residual_path: &Path,
        codec: &str,
        round_id: u64,
        error_feedback: bool,
    ) -> Result<SignedUpdate, FedgeError> {
        let spec = CodecSpec::parse(codec).map_err(|e| FedgeError::Codec {
            detail: e.to_string(),
        })?;
        if self.samples_since_load == 0 {
            return Err(FedgeError::bad_input(
                "nothing to send: train on local samples before making an update",
            ));
        }
        let delta: Vec<f32> = self
            .params
            .iter()
            .zip(&self.blob.params.values)
            .map(|(n, o)| n - o)
            .collect();
        let mut compressor = if error_feedback {
            Compressor::load(residual_path)
        } else {
            Compressor::default()
        };
        let seed = round_seed(key.verifying_key().as_bytes(), round_id);
        let payload = compressor
            .compress(&spec, &delta, seed, error_feedback)
            .map_err(|e| FedgeError::Codec {
                detail: e.to_string(),
            })?;
        if error_feedback {
            compressor
                .save(residual_path)
                .map_err(|e| io_error("cannot write the residual", residual_path, e))?;
        }
        let manifest = UpdateManifest {
            round_id,
            model_version: self.blob.version(),
            payload_hash: *blake3::hash(&payload).as_bytes(),
            payload_bytes: payload.len() as u64,
            sample_count: self.samples_since_load,
            metrics: self
                .last_mean_loss
                .map(|l| vec![("train_loss".to_string(), l)])
                .unwrap_or_default(),
            device_public_key: key.verifying_key(),
            // Not bound to a federation: the app carries the update itself.
            federation_id: [0; 32],
            partial: None,
        };
        let signature = manifest.sign(key);
        Ok(SignedUpdate {
            manifest: manifest.to_wire().encode_to_vec(),
            signature: signature.to_vec(),
            round_id,
            model_version: manifest.model_version.to_hex(),
            payload_hash: hex::encode(manifest.payload_hash),
            device_public_key: hex::encode(key.verifying_key().as_bytes()),
            sample_count: manifest.sample_count,
            dimension: delta.len() as u64,
            codec: codec.to_string(),
            payload: payload.to_vec(),
        })
    }
}
