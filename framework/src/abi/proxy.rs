//! Calling a served object: encode the input, call through [`Remote`], decode the answer. A
//! failure of the boundary itself (a panic, undecodable bytes, a revoked loan) becomes the
//! method's own error type through [`BoundaryError`], naming the plugin and its library.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::ffi::{RawObject, Remote};
use super::{decode, encode, status};
use crate::anchor::AnchorError;
use crate::generator::GeneratorError;
use crate::model::ModelError;
use crate::source::DataError;
use crate::text::TextError;

/// An error type a proxied method returns: the plugin's typed error decodes into it, and a
/// failure of the call itself becomes one of its variants.
pub(crate) trait BoundaryError: DeserializeOwned {
    /// The call failed at the boundary; `message` names the plugin, its library and the cause.
    fn boundary(message: String) -> Self;
}

impl BoundaryError for String {
    fn boundary(message: String) -> Self {
        message
    }
}

impl BoundaryError for AnchorError {
    fn boundary(message: String) -> Self {
        AnchorError::Plugin(message)
    }
}

impl BoundaryError for ModelError {
    fn boundary(message: String) -> Self {
        ModelError::Plugin(message)
    }
}

impl BoundaryError for GeneratorError {
    fn boundary(message: String) -> Self {
        GeneratorError::Plugin(message)
    }
}

impl BoundaryError for DataError {
    fn boundary(message: String) -> Self {
        DataError::Other(message)
    }
}

impl BoundaryError for TextError {
    fn boundary(message: String) -> Self {
        TextError::Model(message)
    }
}

/// The unit error of methods that cannot fail on the other side (only at the boundary).
impl BoundaryError for () {
    fn boundary(_message: String) -> Self {}
}

/// A served object and what to call it in error messages.
#[derive(Debug)]
pub(crate) struct Proxy {
    remote: Remote,
    label: String,
}

impl Proxy {
    pub(crate) fn new(remote: Remote, label: impl Into<String>) -> Self {
        Self { remote, label: label.into() }
    }

    pub(crate) fn label(&self) -> &str {
        &self.label
    }

    fn fail<E: BoundaryError>(&self, message: String) -> E {
        E::boundary(format!("{}: {message}", self.label))
    }

    /// Calls `method`; an answer of any status but OK becomes the error `E`.
    fn answer<I: Serialize + ?Sized, E: BoundaryError>(
        &self,
        method: u32,
        input: &I,
        args: Vec<RawObject>,
    ) -> Result<super::ffi::Answer, E> {
        let input = encode(input).map_err(|m| self.fail::<E>(m))?;
        let answer = self.remote.call(method, &input, args);
        match answer.status {
            status::OK => Ok(answer),
            status::ERROR => Err(decode::<E>(&answer.bytes).unwrap_or_else(|m| self.fail(m))),
            other => Err(self.fail(status::describe(other, &answer.bytes))),
        }
    }

    /// Calls `method` with `input` and argument objects; decodes `T` or the error `E`.
    pub(crate) fn call_with<I: Serialize + ?Sized, T: DeserializeOwned, E: BoundaryError>(
        &self,
        method: u32,
        input: &I,
        args: Vec<RawObject>,
    ) -> Result<T, E> {
        let answer = self.answer::<I, E>(method, input, args)?;
        decode(&answer.bytes).map_err(|m| self.fail(m))
    }

    /// Calls `method` with `input`; decodes `T` or the error `E`.
    pub(crate) fn call<I: Serialize + ?Sized, T: DeserializeOwned, E: BoundaryError>(
        &self,
        method: u32,
        input: &I,
    ) -> Result<T, E> {
        self.call_with(method, input, Vec::new())
    }

    /// Calls a method that answers a new object.
    pub(crate) fn call_object<I: Serialize + ?Sized, E: BoundaryError>(
        &self,
        method: u32,
        input: &I,
        args: Vec<RawObject>,
    ) -> Result<Remote, E> {
        let answer = self.answer::<I, E>(method, input, args)?;
        answer.object.ok_or_else(|| self.fail("answered without an object".into()))
    }
}

/// A string as `&'static str`, leaked once per distinct value: traits that hand out
/// `&'static str` (shift kinds) get them from a proxy without leaking per call.
pub(crate) fn intern(text: &str) -> &'static str {
    use std::collections::BTreeSet;
    use std::sync::Mutex;
    static INTERNED: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
    let mut set = INTERNED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(s) = set.get(text) {
        return s;
    }
    let leaked: &'static str = Box::leak(text.to_string().into_boxed_str());
    set.insert(leaked);
    leaked
}
