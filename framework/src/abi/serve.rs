//! Serving objects across the boundary: [`Serve`], what a call answers ([`Outcome`]), and the
//! helpers every served trait uses to decode a method's input and encode its result. Both sides
//! serve: a library its plugins, the host what it passes into a call.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::ffi::Remote;
use super::{decode, encode, status};

/// An object served across the boundary. Calls may come from any thread (hence `Sync`);
/// objects that need exclusive access hold a mutex.
pub trait Serve: Send + Sync {
    /// Answers one call; `args` are objects the caller handed over for it.
    fn serve(&self, method: u32, input: &[u8], args: Vec<Remote>) -> Outcome;
}

/// What a call answers: a status, bytes, and optionally a new object.
pub struct Outcome {
    status: u32,
    bytes: Vec<u8>,
    object: Option<Box<dyn Serve>>,
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outcome").field("status", &self.status).field("bytes", &self.bytes.len()).finish()
    }
}

impl Outcome {
    /// A result: `Ok` encodes the value, `Err` the method's typed error.
    pub(crate) fn of<T: Serialize, E: Serialize>(result: Result<T, E>) -> Self {
        let (status, bytes) = match result {
            Ok(value) => (status::OK, encode(&value)),
            Err(error) => (status::ERROR, encode(&error)),
        };
        match bytes {
            Ok(bytes) => Self { status, bytes, object: None },
            Err(message) => Self::failure(status::BAD_OUTPUT, message),
        }
    }

    /// A value of a method that cannot fail.
    pub(crate) fn value<T: Serialize>(value: T) -> Self {
        Self::of::<T, ()>(Ok(value))
    }

    /// A new object, or the method's typed error.
    pub(crate) fn object<E: Serialize>(result: Result<Box<dyn Serve>, E>) -> Self {
        match result {
            Ok(object) => Self { status: status::OK, bytes: Vec::new(), object: Some(object) },
            Err(error) => Self::of::<(), E>(Err(error)),
        }
    }

    fn failure(status: u32, message: String) -> Self {
        Self { status, bytes: message.into_bytes(), object: None }
    }

    /// The method number is not one of this object's.
    pub(crate) fn unknown(method: u32) -> Self {
        Self::failure(status::UNKNOWN_METHOD, format!("no method {method}"))
    }

    /// The method needs an argument object that was not passed.
    pub(crate) fn missing_argument(what: &str) -> Self {
        Self::failure(status::BAD_INPUT, format!("missing argument: {what}"))
    }

    /// A lent object used after the call that lent it returned.
    pub(crate) fn revoked() -> Self {
        Self::failure(status::REVOKED, "the object was lent for one call, which has returned".into())
    }

    /// A panic caught at the boundary.
    pub(super) fn panicked(payload: &(dyn std::any::Any + Send)) -> Self {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic with a non-text payload".into());
        Self::failure(status::PANIC, message)
    }

    pub(super) fn into_parts(self) -> (u32, Vec<u8>, Option<Box<dyn Serve>>) {
        (self.status, self.bytes, self.object)
    }
}

/// Decodes a method's input and answers with `f`'s result.
pub(crate) fn with<I: DeserializeOwned, T: Serialize, E: Serialize>(
    input: &[u8],
    f: impl FnOnce(I) -> Result<T, E>,
) -> Outcome {
    match decode::<I>(input) {
        Ok(input) => Outcome::of(f(input)),
        Err(message) => Outcome::failure(status::BAD_INPUT, message),
    }
}

/// Decodes a method's input and answers with the object `f` makes.
pub(crate) fn with_object<I: DeserializeOwned, E: Serialize>(
    input: &[u8],
    f: impl FnOnce(I) -> Result<Box<dyn Serve>, E>,
) -> Outcome {
    match decode::<I>(input) {
        Ok(input) => Outcome::object(f(input)),
        Err(message) => Outcome::failure(status::BAD_INPUT, message),
    }
}
