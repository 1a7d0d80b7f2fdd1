//! Socket-local storage (`BPF_MAP_TYPE_SK_STORAGE`): per-socket state with no node-wide
//! capacity, freed by the kernel with its socket, so no pod can evict another's and nothing
//! has to be deleted at close.
//!
//! aya-ebpf 0.2.1's `btf_maps::SkStorage` only takes a sock_addr context and fixes the flags,
//! so the definition is ours: a BTF map definition in `.maps` (aya's loader reads those), and
//! the helpers called directly on the socket pointer each hook is given (`ctx->sk`).
//! Kernels let cgroup sock_addr, sock_ops, getsockopt and sk_msg programs call them; sk_lookup
//! programs cannot (nothing there needs them).

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{bpf_map_type::BPF_MAP_TYPE_SK_STORAGE, BPF_SK_STORAGE_GET_F_CREATE},
    helpers::generated::{bpf_sk_storage_delete, bpf_sk_storage_get},
};

use crate::ctx::Sk;

/// `BPF_F_NO_PREALLOC`: required for socket storage.
pub const NO_PREALLOC: usize = 1;
/// `BPF_F_NO_PREALLOC | BPF_F_CLONE`: a listener's value is copied to the sockets it accepts.
pub const CLONED: usize = 1 | 512;

/// The BTF map definition: each field's type carries one property (libbpf's `__uint`/`__type`
/// convention), the values are never read.
#[repr(C)]
pub struct SkStorage<V, const FLAGS: usize> {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const V,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; FLAGS],
}

// SAFETY: the fields are placeholders the loader reads from BTF; nothing dereferences them, so
// sharing the static between programs shares no state.
unsafe impl<V, const FLAGS: usize> Sync for SkStorage<V, FLAGS> {}

impl<V, const FLAGS: usize> SkStorage<V, FLAGS> {
    pub const fn new() -> Self {
        Self {
            r#type: ptr::null(),
            key: ptr::null(),
            value: ptr::null(),
            max_entries: ptr::null(),
            map_flags: ptr::null(),
        }
    }

    #[inline(always)]
    fn map(&self) -> *mut c_void {
        ptr::from_ref(self).cast_mut().cast()
    }

    /// The socket's value, if it has one. The value is the kernel's, not borrowed from the map
    /// definition (hence `&mut` from `&self`); it stays valid for the program run.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    pub fn get(&self, sk: Sk) -> Option<&mut V> {
        // SAFETY: `sk` is a socket the kernel gave this run (`ctx::Sk`); the helper returns
        // NULL or this socket's value, valid for the program run.
        unsafe {
            bpf_sk_storage_get(self.map(), sk.as_ptr().cast(), ptr::null_mut(), 0)
                .cast::<V>()
                .as_mut()
        }
    }

    /// The socket's value, created zeroed if it has none; None if it cannot be allocated.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    pub fn get_or_create(&self, sk: Sk) -> Option<&mut V> {
        // SAFETY: as in `get`; with F_CREATE and no initial value the kernel zeroes it.
        unsafe {
            bpf_sk_storage_get(
                self.map(),
                sk.as_ptr().cast(),
                ptr::null_mut(),
                u64::from(BPF_SK_STORAGE_GET_F_CREATE),
            )
            .cast::<V>()
            .as_mut()
        }
    }

    /// Drops the socket's value (nothing if it has none).
    #[inline(always)]
    pub fn delete(&self, sk: Sk) {
        // SAFETY: as in `get`; deleting a missing value only returns -ENOENT.
        unsafe {
            bpf_sk_storage_delete(self.map(), sk.as_ptr().cast());
        }
    }
}
