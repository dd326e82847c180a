//! A task's prefix keys and values, laid out once at load in the order attention consumes them.

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor};

/// Per-layer prefix keys and values of one task, stored as one flat `[L, 2, H, P, D]` array
/// (layer, key/value, head, virtual token, head dim).
///
/// PEFT stores the prefix as `[P, L·2·Hd]` with columns `[K_0 | V_0 | … ]`. Attention wants, per
/// layer, `[H, P, D]` blocks it can copy next to the batch's own keys, so the permutation is done
/// here, once, rather than on every forward pass. The data is behind an `Arc` so that queued rows
/// can hold the exact prefix they were admitted with at no cost.
#[derive(Clone, Debug)]
pub struct PrefixKv {
    num_virtual_tokens: usize,
    layers: usize,
    heads: usize,
    head_dim: usize,
    data: Arc<Pages>,
    /// The same prefix on the model's GPU, uploaded at its first batch and freed with the last
    /// clone of this prefix.
    on_device: Arc<OnceLock<Tensor>>,
}

impl PrefixKv {
    /// Lays out PEFT's `prompt_embeddings` (`[P, L·2·Hd]`, row-major) for attention.
    /// The caller has checked the shape; this only permutes.
    pub fn from_peft_layout(
        prompt_embeddings: &[f32],
        num_virtual_tokens: usize,
        layers: usize,
        heads: usize,
        head_dim: usize,
    ) -> Self {
        let (p, h, d) = (num_virtual_tokens, heads, head_dim);
        let hidden = h * d;
        let row_width = layers * 2 * hidden;
        assert_eq!(
            prompt_embeddings.len(),
            p * row_width,
            "prefix shape checked by caller"
        );
        // Written once, in destination order, straight into its own pages: no Vec-to-Arc copy
        // (at 10,000 tasks the copies and zeroing passes were most of the load time).
        let mut data = Pages::new(prompt_embeddings.len());
        let out = data.as_uninit_mut();
        let mut at = 0;
        for l in 0..layers {
            for kv in 0..2 {
                for head in 0..h {
                    for t in 0..p {
                        let src = t * row_width + (2 * l + kv) * hidden + head * d;
                        for (o, &x) in out[at..at + d]
                            .iter_mut()
                            .zip(&prompt_embeddings[src..src + d])
                        {
                            o.write(x);
                        }
                        at += d;
                    }
                }
            }
        }
        assert_eq!(at, out.len());
        // SAFETY: the loops above wrote every element exactly once (`at` covered the slice).
        unsafe { data.set_init() };
        let data = Arc::new(data);
        Self {
            num_virtual_tokens: p,
            layers,
            heads: h,
            head_dim: d,
            data,
            on_device: Arc::new(OnceLock::new()),
        }
    }

    /// The inverse of [`PrefixKv::from_peft_layout`]: PEFT's `[P, L·2·Hd]` row-major layout.
    pub fn to_peft_layout(&self) -> Vec<f32> {
        let (p, h, d) = (self.num_virtual_tokens, self.heads, self.head_dim);
        let hidden = h * d;
        let row_width = self.layers * 2 * hidden;
        let mut out = vec![0f32; self.data.len()];
        for l in 0..self.layers {
            for kv in 0..2 {
                for head in 0..h {
                    for t in 0..p {
                        let dst = t * row_width + (2 * l + kv) * hidden + head * d;
                        let src = (((l * 2 + kv) * h + head) * p + t) * d;
                        out[dst..dst + d].copy_from_slice(&self.data[src..src + d]);
                    }
                }
            }
        }
        out
    }

    pub fn num_virtual_tokens(&self) -> usize {
        self.num_virtual_tokens
    }

    pub fn layers(&self) -> usize {
        self.layers
    }

    pub fn heads(&self) -> usize {
        self.heads
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Identifies the prefix data: clones share it, a reloaded task gets a new one.
    pub(crate) fn id(&self) -> usize {
        self.data.as_ptr() as usize
    }

    /// The prefix as a `[L, 2, H, P, D]` tensor on `device` in `dtype`. On a GPU it is uploaded
    /// once and kept; on the CPU (the composed path, used by tests) it is built each time.
    pub(crate) fn tensor_on(&self, device: &Device, dtype: DType) -> candle_core::Result<Tensor> {
        if let Some(t) = self.on_device.get() {
            if t.dtype() == dtype && t.device().same_device(device) {
                return Ok(t.clone());
            }
        }
        let shape = (
            self.layers,
            2,
            self.heads,
            self.num_virtual_tokens,
            self.head_dim,
        );
        let t = Tensor::from_slice(&self.data, shape, device)?.to_dtype(dtype)?;
        if !device.is_cpu() {
            let _ = self.on_device.set(t.clone());
        }
        Ok(t)
    }

    /// The `[P, D]` block of one layer, key (`kv = 0`) or value (`kv = 1`), and head.
    pub(crate) fn block(&self, layer: usize, kv: usize, head: usize) -> &[f32] {
        let len = self.num_virtual_tokens * self.head_dim;
        let start = ((layer * 2 + kv) * self.heads + head) * len;
        &self.data[start..start + len]
    }
}

/// A prefix's floats in pages of their own (an anonymous mapping), not in the allocator's heap.
///
/// Thousands of tasks each hold one ~370 KB block for as long as they are loaded, while loading
/// them churns through same-sized temporary buffers. In the allocator's heap the long-lived
/// blocks pinned partly free segments, and resident memory came to 1.27× the prefix bytes at
/// 10,000 tasks; mapped on their own they cost their size rounded up to a page, and unmapping
/// one (an evicted or replaced task) returns exactly that to the system. Falls back to the heap
/// if the system refuses a mapping (e.g. `vm.max_map_count`).
pub(crate) struct Pages {
    ptr: std::ptr::NonNull<f32>,
    len: usize,
    mapped: bool,
    /// Whether every element has been written (only then may it be read).
    init: bool,
}

// SAFETY: `Pages` owns its memory exclusively, like a `Box<[f32]>`.
unsafe impl Send for Pages {}
// SAFETY: shared access is read-only (`Deref`), like `&[f32]`.
unsafe impl Sync for Pages {}

impl Pages {
    fn new(len: usize) -> Self {
        let bytes = len.max(1) * std::mem::size_of::<f32>();
        // SAFETY: an anonymous private mapping of `bytes`; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            if let Some(ptr) = std::ptr::NonNull::new(p as *mut f32) {
                return Self {
                    ptr,
                    len,
                    mapped: true,
                    init: false,
                };
            }
        }
        let boxed: Box<[f32]> = vec![0f32; len.max(1)].into_boxed_slice();
        let ptr = std::ptr::NonNull::new(Box::into_raw(boxed) as *mut f32).expect("non-null box");
        Self {
            ptr,
            len,
            mapped: false,
            init: true,
        }
    }

    fn as_uninit_mut(&mut self) -> &mut [std::mem::MaybeUninit<f32>] {
        // SAFETY: `ptr` is valid for `len` elements and uniquely borrowed through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().cast(), self.len) }
    }

    /// # Safety
    /// Every element must have been written through [`Pages::as_uninit_mut`].
    unsafe fn set_init(&mut self) {
        self.init = true;
    }
}

impl std::ops::Deref for Pages {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        assert!(self.init, "prefix pages read before being written");
        // SAFETY: valid for `len` initialised elements (checked above), never written again.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        let alloc_len = self.len.max(1);
        if self.mapped {
            // SAFETY: unmapping exactly the mapping made in `new`.
            unsafe {
                libc::munmap(
                    self.ptr.as_ptr().cast(),
                    alloc_len * std::mem::size_of::<f32>(),
                );
            }
        } else {
            // SAFETY: rebuilding the box made in `new`, once.
            drop(unsafe {
                Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                    self.ptr.as_ptr(),
                    alloc_len,
                ))
            });
        }
    }
}

impl std::fmt::Debug for Pages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pages({} f32, mapped: {})", self.len, self.mapped)
    }
}
