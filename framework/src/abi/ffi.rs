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

/// A call into an object: `(ctx, method, input, input_len, args, n_args, sink, new_object) ->
/// status`. The callee owns the `n_args` objects at `args` from the call on (it drops each).
pub type CallFn = unsafe extern "C" fn(
    ctx: *mut c_void,
    method: u32,
    input: *const u8,
    input_len: usize,
    args: *mut RawObject,
    n_args: usize,
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

/// Turns a served object into its raw form; whoever receives it owns it until it calls `drop`.
/// Both sides serve objects: the library its plugins, the host what it passes into a call
/// (a data source, progress, the model a generator trains through).
pub fn object_from(served: Box<dyn Serve>) -> RawObject {
    let ctx = Box::into_raw(Box::new(served)).cast::<c_void>();
    RawObject { ctx, call: Some(call_served), drop: Some(drop_served) }
}

unsafe extern "C" fn call_served(
    ctx: *mut c_void,
    method: u32,
    input: *const u8,
    input_len: usize,
    args: *mut RawObject,
    n_args: usize,
    sink: *mut RawSink,
    new_object: *mut RawObject,
) -> u32 {
    // Take ownership of the arguments first, so they are released whatever happens next.
    let args: Vec<Remote> = (0..n_args)
        // SAFETY: the caller passes `n_args` objects at `args` and hands their ownership over;
        // each is read exactly once, and the caller does not release them.
        .map(|i| Remote(unsafe { std::ptr::read(args.add(i)) }))
        .collect();
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `ctx` came from `object_from` and is called only before `drop`.
        let served: &dyn Serve = unsafe { &**ctx.cast::<Box<dyn Serve>>() };
        let input: &[u8] = if input_len == 0 || input.is_null() {
            &[]
        } else {
            // SAFETY: the caller passes `input_len` readable bytes that outlive this call.
            unsafe { std::slice::from_raw_parts(input, input_len) }
        };
        served.serve(method, input, args)
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
    /// Calls a method with input bytes, handing over `args` (objects this side serves, made with
    /// [`object_from`] or [`lend`]).
    pub fn call(&self, method: u32, input: &[u8], args: Vec<RawObject>) -> Answer {
        let mut bytes: Vec<u8> = Vec::new();
        let mut sink = RawSink { ctx: (&raw mut bytes).cast::<c_void>(), write: sink_write };
        let mut object = RawObject::NONE;
        let Some(call) = self.0.call else {
            drop(args.into_iter().map(Remote).collect::<Vec<_>>());
            return Answer { status: super::status::UNKNOWN_METHOD, bytes, object: None };
        };
        // The callee takes ownership of every argument: forget them here, never release twice.
        let mut args = std::mem::ManuallyDrop::new(args);
        // SAFETY: `self.0` is a live object (libraries are never unloaded and `Remote` drops it
        // once); the input, arguments, sink and out-slot outlive the call.
        let status = unsafe {
            call(
                self.0.ctx,
                method,
                input.as_ptr(),
                input.len(),
                args.as_mut_ptr(),
                args.len(),
                &raw mut sink,
                &raw mut object,
            )
        };
        // SAFETY: the vector's buffer is ours; its elements were moved out by the callee.
        unsafe { args.set_len(0) };
        drop(std::mem::ManuallyDrop::into_inner(args));
        let object = object.call.is_some().then_some(Remote(object));
        Answer { status, bytes, object }
    }
}

/// A borrowed object lent into one call: usable until the lender revokes it (when the call
/// returns), after which every call answers an error instead of touching freed memory.
struct Lent {
    slot: std::sync::RwLock<Option<&'static dyn Serve>>,
}

impl Serve for std::sync::Arc<Lent> {
    fn serve(&self, method: u32, input: &[u8], args: Vec<Remote>) -> Outcome {
        let slot = self.slot.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        match *slot {
            Some(served) => served.serve(method, input, args),
            None => Outcome::revoked(),
        }
    }
}

/// Revokes a lent object when dropped.
#[derive(Debug)]
struct Lease(std::sync::Arc<Lent>);

impl std::fmt::Debug for Lent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lent")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // The write lock waits for calls in flight, so none outlives the borrow.
        *self.0.slot.write().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }
}

/// Lends borrowed objects into `f`'s calls: each crosses the boundary as an argument although
/// it borrows local data, and is revoked when `f` returns (or unwinds).
pub fn with_lent<'a, R>(lent: &[&'a (dyn Serve + 'a)], f: impl FnOnce(Vec<RawObject>) -> R) -> R {
    let mut leases = Vec::with_capacity(lent.len());
    let mut raw = Vec::with_capacity(lent.len());
    for served in lent {
        // SAFETY: the `'static` reference is reachable only through `slot`, and the `Lease`
        // below clears `slot` under the write lock before this function returns or unwinds
        // (leases are locals here, never handed out, so they cannot be forgotten); every use
        // holds the read lock and checks the slot first. So no use outlives `'a`.
        let extended: &'static dyn Serve =
            unsafe { std::mem::transmute::<&'a (dyn Serve + 'a), &'static dyn Serve>(*served) };
        let cell = std::sync::Arc::new(Lent { slot: std::sync::RwLock::new(Some(extended)) });
        raw.push(object_from(Box::new(cell.clone())));
        leases.push(Lease(cell));
    }
    let result = f(raw);
    drop(leases);
    result
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
    // SAFETY: `raw` points to a descriptor of some ABI version; `abi`, a `u32`, is its first
    // field in every version, so reading those four bytes is valid whatever the rest of the
    // layout (and its alignment: another version's descriptor may be less aligned than ours).
    let abi = unsafe { raw.cast::<u32>().read_unaligned() };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::status;

    /// Answers its input back, or panics on method 9.
    struct Echo;

    impl Serve for Echo {
        fn serve(&self, method: u32, input: &[u8], args: Vec<Remote>) -> Outcome {
            match method {
                9 => panic!("echo was asked to panic"),
                // Calls its first argument's method 1 and answers what it said.
                2 => match args.first() {
                    Some(inner) => Outcome::value(inner.call(1, input, Vec::new()).bytes),
                    None => Outcome::missing_argument("an object"),
                },
                _ => Outcome::value(input.to_vec()),
            }
        }
    }

    fn echo() -> Remote {
        Remote(object_from(Box::new(Echo)))
    }

    #[test]
    fn a_call_answers_through_the_sink_and_a_panic_becomes_a_status() {
        let remote = echo();
        let answer = remote.call(1, b"hello", Vec::new());
        assert_eq!(answer.status, status::OK);
        assert_eq!(crate::abi::decode::<Vec<u8>>(&answer.bytes).expect("decodes"), b"hello");
        let answer = remote.call(9, b"", Vec::new());
        assert_eq!(answer.status, status::PANIC);
        assert_eq!(String::from_utf8_lossy(&answer.bytes), "echo was asked to panic");
        // The object survives its panic.
        assert_eq!(remote.call(1, b"again", Vec::new()).status, status::OK);
    }

    #[test]
    fn arguments_are_handed_over_and_lent_objects_are_revoked_when_the_call_returns() {
        let remote = echo();
        let local = Echo;
        let answer = with_lent(&[&local], |args| remote.call(2, b"via the loan", args));
        assert_eq!(answer.status, status::OK);
        // A callee that keeps a lent object finds it revoked afterwards, not dangling.
        let kept = with_lent(&[&local], |mut args| args.pop().map(Remote).expect("one argument"));
        let answer = kept.call(1, b"too late", Vec::new());
        assert_eq!(answer.status, status::REVOKED);
        // Given (not lent) objects belong to the callee and stay usable.
        let answer = remote.call(2, b"given", vec![object_from(Box::new(Echo))]);
        assert_eq!(answer.status, status::OK);
    }
}
