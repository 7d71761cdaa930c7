//! What the host passes into a library's calls, across the boundary: the data source and the
//! progress sink a training borrows, and the text encoder a model keeps. Each is served by the
//! host and seen by the library through a proxy implementing the ordinary trait.

use std::sync::Arc;

use super::ffi::Remote;
use super::proxy::{Proxy, intern};
use super::serve::{Outcome, Serve, with};
use crate::Progress;
use crate::data::{Clip, DomainSpec, Shift, Split, TaskSpec};
use crate::source::{DataError, DataSource};
use crate::tensor::HostTensor;
use crate::text::{TextEncoder, TextError, TextSource};

/// Data source methods.
mod data {
    /// `()` → `(TaskSpec, Vec<String>, Vec<String>, u32)`: task, shift kinds, source kinds, phrasings.
    pub const DESCRIBE: u32 = 1;
    /// `(DomainSpec, Split, usize, u64)` → `Vec<Clip>`.
    pub const CLIPS: u32 = 2;
    /// `DomainSpec` → `bool`.
    pub const IS_SHIFTED: u32 = 3;
    /// `Shift` → `()`.
    pub const CHECK_SHIFT: u32 = 4;
    /// `(usize, u64, Vec<DomainSpec>)` → `Vec<DomainSpec>`.
    pub const SOURCE_DOMAINS: u32 = 5;
}

/// The host's data source, lent into a call.
pub(crate) struct LentData<'a>(pub(crate) &'a dyn DataSource);

impl Serve for LentData<'_> {
    fn serve(&self, method: u32, input: &[u8], _args: Vec<Remote>) -> Outcome {
        let d = self.0;
        match method {
            data::DESCRIBE => Outcome::value((d.task(), d.shift_kinds(), d.source_kinds(), d.phrasings())),
            data::CLIPS => with(input, |(domain, split, count, seed): (DomainSpec, Split, usize, u64)| {
                d.clips(&domain, split, count, seed)
            }),
            data::IS_SHIFTED => with(input, |domain: DomainSpec| Ok::<_, ()>(d.is_shifted(&domain))),
            data::CHECK_SHIFT => with(input, |shift: Shift| d.check_shift(&shift)),
            data::SOURCE_DOMAINS => with(input, |(count, seed, held_out): (usize, u64, Vec<DomainSpec>)| {
                Ok::<_, ()>(d.source_domains(count, seed, &held_out))
            }),
            other => Outcome::unknown(other),
        }
    }
}

/// A data source on the other side of the boundary.
pub(crate) struct RemoteData {
    proxy: Proxy,
    task: TaskSpec,
    shift_kinds: Vec<&'static str>,
    source_kinds: Vec<&'static str>,
    phrasings: u32,
}

impl RemoteData {
    pub(crate) fn new(proxy: Proxy) -> Result<Self, DataError> {
        let (task, shift_kinds, source_kinds, phrasings): (TaskSpec, Vec<String>, Vec<String>, u32) =
            proxy.call::<_, _, DataError>(data::DESCRIBE, &())?;
        let interned = |kinds: Vec<String>| kinds.iter().map(|k| intern(k)).collect();
        Ok(Self { proxy, task, shift_kinds: interned(shift_kinds), source_kinds: interned(source_kinds), phrasings })
    }
}

impl DataSource for RemoteData {
    fn task(&self) -> &TaskSpec {
        &self.task
    }

    fn shift_kinds(&self) -> &[&'static str] {
        &self.shift_kinds
    }

    fn clips(&self, domain: &DomainSpec, split: Split, count: usize, seed: u64) -> Result<Vec<Clip>, DataError> {
        self.proxy.call(data::CLIPS, &(domain, split, count, seed))
    }

    fn source_kinds(&self) -> &[&'static str] {
        &self.source_kinds
    }

    fn is_shifted(&self, domain: &DomainSpec) -> bool {
        // Only the boundary can fail here; the trait's own rule is the fallback.
        self.proxy.call::<_, bool, ()>(data::IS_SHIFTED, domain).unwrap_or(!domain.shifts.is_empty())
    }

    fn phrasings(&self) -> u32 {
        self.phrasings
    }

    fn check_shift(&self, shift: &Shift) -> Result<(), DataError> {
        self.proxy.call(data::CHECK_SHIFT, shift)
    }

    fn source_domains(&self, count: usize, seed: u64, held_out: &[DomainSpec]) -> Vec<DomainSpec> {
        // Drawing domains cannot fail on the other side; at the boundary, fall back to the
        // trait's own drawing from the kinds it reported.
        self.proxy
            .call::<_, Vec<DomainSpec>, String>(data::SOURCE_DOMAINS, &(count, seed, held_out))
            .unwrap_or_else(|_| DefaultDomains(self).source_domains(count, seed, held_out))
    }
}

/// The trait's provided `source_domains` over a proxy's reported kinds.
struct DefaultDomains<'a>(&'a RemoteData);

impl DataSource for DefaultDomains<'_> {
    fn task(&self) -> &TaskSpec {
        &self.0.task
    }
    fn shift_kinds(&self) -> &[&'static str] {
        &self.0.shift_kinds
    }
    fn clips(&self, domain: &DomainSpec, split: Split, count: usize, seed: u64) -> Result<Vec<Clip>, DataError> {
        self.0.clips(domain, split, count, seed)
    }
    fn source_kinds(&self) -> &[&'static str] {
        &self.0.source_kinds
    }
    fn phrasings(&self) -> u32 {
        self.0.phrasings
    }
}

/// Progress methods.
mod progress {
    /// `(String, u64)` → `()`.
    pub const START: u32 = 1;
    /// `Option<String>` → `()`.
    pub const STEP: u32 = 2;
    /// `()` → `()`.
    pub const FINISH: u32 = 3;
}

/// The host's progress sink, lent into a call.
pub(crate) struct LentProgress<'a>(pub(crate) &'a dyn Progress);

impl Serve for LentProgress<'_> {
    fn serve(&self, method: u32, input: &[u8], _args: Vec<Remote>) -> Outcome {
        let p = self.0;
        match method {
            progress::START => with(input, |(phase, total): (String, u64)| {
                p.start(&phase, total);
                Ok::<_, ()>(())
            }),
            progress::STEP => with(input, |status: Option<String>| {
                p.step(status);
                Ok::<_, ()>(())
            }),
            progress::FINISH => {
                p.finish();
                Outcome::value(())
            }
            other => Outcome::unknown(other),
        }
    }
}

/// A progress sink on the other side of the boundary. Progress is advisory: a failed report
/// is dropped, never an error of the training that reports it.
pub(crate) struct RemoteProgress(pub(crate) Proxy);

impl Progress for RemoteProgress {
    fn start(&self, phase: &str, total: u64) {
        let _ = self.0.call::<_, (), ()>(progress::START, &(phase, total));
    }

    fn step(&self, status: Option<String>) {
        let _ = self.0.call::<_, (), ()>(progress::STEP, &status);
    }

    fn finish(&self) {
        let _ = self.0.call::<_, (), ()>(progress::FINISH, &());
    }
}

/// Text encoder methods.
mod text {
    /// `()` → `usize`.
    pub const DIM: u32 = 1;
    /// `Vec<String>` → `HostTensor`.
    pub const EMBED: u32 = 2;
}

/// The deployment's text encoder, given to a model (which keeps it): the host's cache and memo
/// stay on the host.
pub(crate) struct OwnedText(pub(crate) Arc<TextSource>);

impl Serve for OwnedText {
    fn serve(&self, method: u32, input: &[u8], _args: Vec<Remote>) -> Outcome {
        match method {
            text::DIM => Outcome::value(self.0.dim()),
            text::EMBED => {
                with(input, |texts: Vec<String>| self.0.embed(&texts.iter().map(String::as_str).collect::<Vec<_>>()))
            }
            other => Outcome::unknown(other),
        }
    }
}

/// The host's text encoder as a library's model sees it.
pub(crate) struct RemoteText {
    proxy: Proxy,
    dim: usize,
}

impl RemoteText {
    /// A `TextSource` over the host's: no cache of its own (the host caches).
    pub(crate) fn source(proxy: Proxy) -> Result<TextSource, TextError> {
        let dim = proxy.call::<_, _, TextError>(text::DIM, &())?;
        Ok(TextSource::new(Box::new(Self { proxy, dim }), None, String::new()))
    }
}

impl TextEncoder for RemoteText {
    fn dim(&self) -> usize {
        self.dim
    }

    fn model_id(&self) -> String {
        // Only for on-disk caching, which stays on the host.
        format!("host text encoder ({})", self.proxy.label())
    }

    fn embed(&self, texts: &[&str]) -> Result<HostTensor, TextError> {
        self.proxy.call(text::EMBED, texts)
    }
}
