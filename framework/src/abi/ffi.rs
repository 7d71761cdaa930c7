//! The C ABI of plugin libraries: the `#[repr(C)]` types that cross it and every `unsafe` block
//! of the plugin boundary, host side and plugin side. Nothing else in the workspace may use
//! `unsafe` for plugins; the safe layers ([`super::serve`], [`super::proxy`],
//! [`super::loader`]) speak only [`Remote`] and [`Serve`].
//!
//! The boundary carries one shape of call, in both directions: an object is a context pointer
//! with a `call` and a `drop` function; a call takes a method number and input bytes, and
//! answers a status, output bytes (written through a sink the caller owns, so no allocation
//! ever crosses) and optionally a new object. What the bytes mean is [`super`]'s business.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use super::serve::{Outcome, Serve};

/// Name of the one symbol a plugin library exports (see [`crate::export_plugins`]).
pub const ENTRY_SYMBOL: &str = "mmpg_plugin_library";

/// A borrowed UTF-8 string: pointer and length, valid for the library's lifetime.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RawStr {
    ptr: *const u8,
    len: usize,
}

/// Where a callee writes its answer: the caller's context and a function that copies bytes.
#[repr(C)]
#[derive(Debug)]
pub struct RawSink {
    ctx: *mut c_void,
    write: unsafe extern "C" fn(ctx: *mut c_void, bytes: *const u8, len: usize),
}

/// A call into an object: `(ctx, method, input, input_len, sink, new_object) -> status`.
pub type CallFn = unsafe extern "C" fn(
    ctx: *mut c_void,
    method: u32,
    input: *const u8,
    input_len: usize,
    sink: *mut RawSink,
    new_object: *mut RawObject,
) -> u32;

/// Releases an object.
pub type DropFn = unsafe extern "C" fn(ctx: *mut c_void);

/// An object across the boundary. `call == None` means "no object" (the empty out-slot).
#[repr(C)]
#[derive(Debug)]
pub struct RawObject {
    ctx: *mut c_void,
    call: Option<CallFn>,
    drop: Option<DropFn>,
}

impl RawObject {
    const NONE: Self = Self { ctx: std::ptr::null_mut(), call: None, drop: None };
}

/// What the entry point returns. **`abi` stays the first field in every ABI version**, so a
/// host reads it from any library before trusting the rest of the layout.
#[repr(C)]
#[derive(Debug)]
pub struct RawLibrary {
    /// [`super::ABI_VERSION`] of the mmpg the library was built against.
    pub abi: u32,
    mmpg_version: RawStr,
    target: RawStr,
    backends: RawStr,
    root: RawObject,
}

/// The entry point's signature.
pub type EntryFn = unsafe extern "C" fn() -> *const RawLibrary;

// ----------------------------------------------------------------------------------------
// Plugin side.

/// The descriptor, built once per library and never freed (libraries are never unloaded).
struct Exported(RawLibrary);

// SAFETY: the descriptor is immutable after construction; its strings are leaked `'static`
// data and its root object is a `Box<dyn Serve>` (`Send + Sync`) that is never dropped.
unsafe impl Sync for Exported {}
// SAFETY: as above.
unsafe impl Send for Exported {}

static EXPORTED: std::sync::OnceLock<Option<Exported>> = std::sync::OnceLock::new();

fn raw_str(s: String) -> RawStr {
    let leaked: &'static str = Box::leak(s.into_boxed_str());
    RawStr { ptr: leaked.as_ptr(), len: leaked.len() }
}

/// The entry point's body: builds the descriptor on first call. Panics while building (a
/// plugin list that panics) answer a null pointer, which the host reports.
pub fn export(
    abi: u32,
    mmpg_version: String,
    target: String,
    backends: String,
    root: impl FnOnce() -> Box<dyn Serve>,
) -> *const RawLibrary {
    let exported = EXPORTED.get_or_init(|| {
        catch_unwind(AssertUnwindSafe(|| {
            Exported(RawLibrary {
                abi,
                mmpg_version: raw_str(mmpg_version),
                target: raw_str(target),
                backends: raw_str(backends),
                root: object_from(root()),
            })
        }))
        .ok()
    });
    exported.as_ref().map_or(std::ptr::null(), |e| &e.0 as *const RawLibrary)
}

/// Turns a served object into its raw form; the host owns it until it calls `drop`.
fn object_from(served: Box<dyn Serve>) -> RawObject {
    let ctx = Box::into_raw(Box::new(served)).cast::<c_void>();
    RawObject { ctx, call: Some(call_served), drop: Some(drop_served) }
}

unsafe extern "C" fn call_served(
    ctx: *mut c_void,
    method: u32,
    input: *const u8,
    input_len: usize,
    sink: *mut RawSink,
    new_object: *mut RawObject,
) -> u32 {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `ctx` came from `object_from` and the host calls it only before `drop`.
        let served: &dyn Serve = unsafe { &**ctx.cast::<Box<dyn Serve>>() };
        let input: &[u8] = if input_len == 0 || input.is_null() {
            &[]
        } else {
            // SAFETY: the host passes `input_len` readable bytes that outlive this call.
            unsafe { std::slice::from_raw_parts(input, input_len) }
        };
        served.serve(method, input)
    }))
    .unwrap_or_else(|payload| Outcome::panicked(&*payload));
    let (status, bytes, object) = outcome.into_parts();
    // SAFETY: the host passes a valid sink and out-slot for the duration of the call.
    unsafe {
        ((*sink).write)((*sink).ctx, bytes.as_ptr(), bytes.len());
        if let Some(object) = object {
            *new_object = object_from(object);
        }
    }
    status
}

unsafe extern "C" fn drop_served(ctx: *mut c_void) {
    // SAFETY: `ctx` came from `object_from`; the host drops each object exactly once.
    let served = unsafe { Box::from_raw(ctx.cast::<Box<dyn Serve>>()) };
    // A plugin's destructor that panics must not unwind into the host.
    let _ = catch_unwind(AssertUnwindSafe(move || drop(served)));
}

// ----------------------------------------------------------------------------------------
// Host side.

/// An object a library handed the host: calls go through its function table; dropping it
/// releases it in the library.
#[derive(Debug)]
pub struct Remote(RawObject);

// SAFETY: every object a library exports is a `Box<dyn Serve>`, and `Serve: Send + Sync`.
unsafe impl Send for Remote {}
// SAFETY: as above; calls take `&self` on the plugin side too.
unsafe impl Sync for Remote {}

/// A raw answer: status, bytes, and the object the call created, if any.
#[derive(Debug)]
pub struct Answer {
    /// One of the `super::status` codes.
    pub status: u32,
    /// Output bytes.
    pub bytes: Vec<u8>,
    /// A new object.
    pub object: Option<Remote>,
}

unsafe extern "C" fn sink_write(ctx: *mut c_void, bytes: *const u8, len: usize) {
    if len == 0 || bytes.is_null() {
        return;
    }
    // SAFETY: `ctx` is the `Vec<u8>` `Remote::call` lent for this call, and the callee passes
    // `len` readable bytes.
    unsafe { (*ctx.cast::<Vec<u8>>()).extend_from_slice(std::slice::from_raw_parts(bytes, len)) };
}

impl Remote {
    /// Calls a method with input bytes.
    pub fn call(&self, method: u32, input: &[u8]) -> Answer {
        let mut bytes: Vec<u8> = Vec::new();
        let mut sink = RawSink { ctx: (&raw mut bytes).cast::<c_void>(), write: sink_write };
        let mut object = RawObject::NONE;
        let Some(call) = self.0.call else {
            return Answer { status: super::status::UNKNOWN_METHOD, bytes, object: None };
        };
        // SAFETY: `self.0` is a live object of its library (libraries are never unloaded and
        // `Remote` drops it once); the input, sink and out-slot outlive the call.
        let status = unsafe { call(self.0.ctx, method, input.as_ptr(), input.len(), &raw mut sink, &raw mut object) };
        let object = object.call.is_some().then_some(Remote(object));
        Answer { status, bytes, object }
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        if let Some(drop) = self.0.drop {
            // SAFETY: the object is live and this is its only release.
            unsafe { drop(self.0.ctx) };
        }
    }
}

/// What a library's descriptor says, read field by field.
#[derive(Debug)]
pub struct Opened {
    /// Its ABI number.
    pub abi: u32,
    /// The rest, present only when `abi` is this host's (other layouts are not read).
    pub fields: Option<OpenedFields>,
}

/// The descriptor fields after the ABI number.
#[derive(Debug)]
pub struct OpenedFields {
    /// mmpg version it was built against.
    pub mmpg_version: String,
    /// Target it was built for.
    pub target: String,
    /// Backends compiled in, comma-separated; empty when it computes on the host only.
    pub backends: String,
    /// Its root object.
    pub root: Remote,
}

/// Why a file could not be opened as a plugin library.
#[derive(Debug)]
pub enum OpenFailure {
    /// The dynamic loader refused it.
    Dlopen(String),
    /// It has no entry point.
    NoEntry,
    /// Its entry point answered null.
    EntryFailed,
}

/// Loads a library and reads its descriptor. The library stays loaded for the life of the
/// process, whatever the outcome.
pub fn open(path: &Path, expected_abi: u32) -> Result<Opened, OpenFailure> {
    // SAFETY: loading runs the library's initialisers. The caller has checked the file's
    // sha256 against the deployment's pin (or warned that it is unpinned); beyond that,
    // loading a library is trusting it, as with any native plugin system.
    let library = unsafe { libloading::Library::new(path) }.map_err(|e| OpenFailure::Dlopen(e.to_string()))?;
    let library: &'static libloading::Library = Box::leak(Box::new(library));
    // SAFETY: the symbol, when present, is the `extern "C" fn() -> *const RawLibrary` that
    // `export_plugins!` defines; its name is reserved for that purpose.
    let entry = unsafe { library.get::<EntryFn>(ENTRY_SYMBOL.as_bytes()) }.map_err(|_| OpenFailure::NoEntry)?;
    // SAFETY: calling the entry point as declared; it catches its own panics.
    let raw = unsafe { entry() };
    if raw.is_null() {
        return Err(OpenFailure::EntryFailed);
    }
    // SAFETY: `raw` points to a `RawLibrary` of some ABI version; `abi` is its first field in
    // every version, so reading it is valid whatever the rest of the layout.
    let abi = unsafe { (*raw).abi };
    if abi != expected_abi {
        return Ok(Opened { abi, fields: None });
    }
    // SAFETY: same ABI, so the layout is this one; the strings are leaked by the library and
    // live as long as it (forever). The root object is read out once and owned by the host.
    let fields = unsafe {
        let text = |s: RawStr| {
            if s.ptr.is_null() {
                String::new()
            } else {
                String::from_utf8_lossy(std::slice::from_raw_parts(s.ptr, s.len)).into_owned()
            }
        };
        let root = &(*raw).root;
        OpenedFields {
            mmpg_version: text((*raw).mmpg_version),
            target: text((*raw).target),
            backends: text((*raw).backends),
            // The root lives in the library's static descriptor: the host never drops it.
            root: Remote(RawObject { ctx: root.ctx, call: root.call, drop: None }),
        }
    };
    Ok(Opened { abi, fields: Some(fields) })
}
