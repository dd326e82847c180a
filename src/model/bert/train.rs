//! The training forwards of [`PrefixedBert`]: which path a step takes (the CPU's hand-written op,
//! the device path's, or candle's autograd as the reference), and the prefix tensor's layout.

use candle_core::{DType, Tensor};
use std::sync::Arc;

use super::super::batch::{HostBatch, TokenBatch};
use super::super::train_ops::Dropout;
use super::super::{cpu_train, Activation, ModelError, Result};
use super::{reference_path_forced, Linear, PrefixedBert};

impl PrefixedBert {
    /// The training forward: rows of one task whose prefix is the (trainable) tensor
    /// `prompt_embeddings`, `[P, L·2·Hd]` in PEFT's layout, with dropout. Gradients flow to the
    /// prefix and never to the frozen weights. Returns the pooled `[B, Hd]`.
    ///
    /// On the CPU in f32 the encoder is one op with a hand-written backward (`cpu_train.rs`); on
    /// a GPU one op over the fused kernels ([`Self::pooled_train_device`]); elsewhere (or with
    /// `PREFIXD_REFERENCE_PATH=1`) candle's autograd over [`Self::pooled_train_reference`]'s ops.
    pub fn pooled_train(
        &self,
        rows: &[(&[u32], &[u32])],
        prompt_embeddings: &Tensor,
        dropout: &mut Dropout,
    ) -> Result<Tensor> {
        if reference_path_forced() {
            return self.pooled_train_reference(rows, prompt_embeddings, dropout);
        }
        let Some(host) = self.host.as_ref() else {
            if self.device_train_applies() {
                return self.pooled_train_device(rows, prompt_embeddings, dropout);
            }
            return self.pooled_train_reference(rows, prompt_embeddings, dropout);
        };
        let (kv, batch) = self.train_inputs(rows, prompt_embeddings)?;
        let back = match self.backward.get() {
            Some(back) => back.clone(),
            None => {
                let built = Arc::new(self.backward_weights()?);
                self.backward.get_or_init(|| built).clone()
            }
        };
        let op = cpu_train::EncoderTrain {
            host: host.clone(),
            back,
            p: batch.p_max,
            batch,
            drop: dropout.next_mask(),
            saved: Default::default(),
        };
        Ok(kv.apply_op1(op)?)
    }

    /// Whether the device training path (`fused::train`) can run this model: f32, erf GELU, and
    /// the fused kernels' size limits.
    fn device_train_applies(&self) -> bool {
        self.dtype == DType::F32
            && self.config.activation() == Activation::GeluErf
            && super::super::fused::supports(&self.config)
    }

    /// The training forward of the device path: the encoder as one op with a hand-written
    /// backward over the fused ops (`fused/train.rs`). What GPUs run; on the CPU it runs on
    /// candle's ops, which is how it is tested.
    pub fn pooled_train_device(
        &self,
        rows: &[(&[u32], &[u32])],
        prompt_embeddings: &Tensor,
        dropout: &mut Dropout,
    ) -> Result<Tensor> {
        if !self.device_train_applies() {
            return Err(ModelError::Device(
                "the device training path needs f32 weights, erf GELU and the fused kernels' sizes"
                    .into(),
            ));
        }
        let (kv, batch) = self.train_inputs(rows, prompt_embeddings)?;
        let op =
            super::super::fused::train::EncoderTrainDevice::new(self, batch, dropout.next_mask())?;
        Ok(kv.apply_op1(op)?)
    }

    /// The training forward through candle's ops and autograd, on any device: the reference the
    /// CPU training path is tested against.
    pub fn pooled_train_reference(
        &self,
        rows: &[(&[u32], &[u32])],
        prompt_embeddings: &Tensor,
        dropout: &mut Dropout,
    ) -> Result<Tensor> {
        let (kv, batch) = self.train_inputs(rows, prompt_embeddings)?;
        let dims = self.dims();
        let (h, d, p) = (dims.heads, dims.head_dim, batch.p_max);
        let inputs = TokenBatch::new(&batch, &self.device)?;
        let b = inputs.rows;
        let prefix = |layer: usize| -> Result<Tensor> {
            Ok(kv.get(layer)?.unsqueeze(1)?.broadcast_as((2, b, h, p, d))?)
        };
        self.encode(&inputs, prefix, &mut Some(dropout))
    }

    /// What every training forward starts from: the prefix `[P, L·2·Hd]` → `[L, 2, H, P, D]` (the
    /// same permutation `PrefixKv` does at load) and the rows as a checked batch, each row behind
    /// the P prefix positions (so `batch.p_max` is P).
    fn train_inputs(
        &self,
        rows: &[(&[u32], &[u32])],
        prompt_embeddings: &Tensor,
    ) -> Result<(Tensor, HostBatch)> {
        let dims = self.dims();
        let (p, width) = prompt_embeddings.dims2()?;
        let (l, h, d) = (dims.layers, dims.heads, dims.head_dim);
        if width != l * 2 * h * d {
            return Err(ModelError::Batch(format!(
                "prompt_embeddings is [{p}, {width}], expected [P, {}]",
                l * 2 * h * d
            )));
        }
        let kv = prompt_embeddings
            .reshape((p, l, 2, h, d))?
            .permute((1, 2, 3, 0, 4))?
            .contiguous()?;
        let tokens: Vec<(&[u32], &[u32], usize)> = rows.iter().map(|r| (r.0, r.1, p)).collect();
        Ok((kv, HostBatch::build(&tokens, &dims)?))
    }

    /// Each dense layer's weight as the backward multiplies by it: `[out, in]`, packed.
    fn backward_weights(&self) -> Result<cpu_train::Backward> {
        let pack = |l: &Linear| -> Result<super::super::gemm::PackedB> {
            let (inp, out) = l.weight_t.dims2()?;
            let w: Vec<f32> = l.weight_t.t()?.contiguous()?.flatten_all()?.to_vec1()?;
            Ok(super::super::gemm::PackedB::pack(&w, out, inp))
        };
        Ok(cpu_train::Backward {
            layers: self
                .layers
                .iter()
                .map(|l| {
                    Ok(cpu_train::LayerBack {
                        qkv: pack(&l.attention.qkv)?,
                        attn_out: pack(&l.attention_output.dense)?,
                        inter: pack(&l.intermediate)?,
                        out: pack(&l.output.dense)?,
                    })
                })
                .collect::<Result<_>>()?,
            pooler: pack(&self.pooler)?,
            spare: Default::default(),
        })
    }
}
