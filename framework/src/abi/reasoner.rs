//! The anchor reasoner across the boundary: served by a library (its plugin) or by the host
//! (lent to a generator's training), and its proxy.

use super::ffi::Remote;
use super::proxy::Proxy;
use super::serve::{Outcome, Serve, with};
use crate::anchor::{AnchorError, AnchorReasoner, AnchorSummary, FeatureStats, Quantisation, QuantisedTensor};
use crate::privacy::SummaryPrivacy;
use crate::tensor::HostTensor;

/// Method numbers.
mod method {
    /// `(HostTensor, u64)` → `Vec<usize>`.
    pub const SELECT: u32 = 1;
    /// `()` → `Quantisation`.
    pub const QUANTISATION: u32 = 2;
    /// `(HostTensor, FeatureStats, usize, u64)` → `AnchorSummary`.
    pub const SUMMARISE: u32 = 3;
    /// `()` → `usize`.
    pub const TEXT_ANCHOR_COUNT: u32 = 4;
    /// `(HostTensor, u64)` → `Option<QuantisedTensor>`.
    pub const SUMMARISE_TEXT: u32 = 5;
    /// `()` → `Option<SummaryPrivacy>`.
    pub const PRIVACY: u32 = 6;
    /// `usize` → `Option<usize>`.
    pub const ANCHOR_COUNT: u32 = 7;
}

fn serve(r: &dyn AnchorReasoner, method: u32, input: &[u8]) -> Outcome {
    match method {
        method::SELECT => with(input, |(features, seed): (HostTensor, u64)| r.select(&features, seed)),
        method::QUANTISATION => Outcome::value(r.quantisation()),
        method::SUMMARISE => {
            with(input, |(features, reference, clips, seed): (HostTensor, FeatureStats, usize, u64)| {
                r.summarise(&features, &reference, clips, seed)
            })
        }
        method::TEXT_ANCHOR_COUNT => Outcome::value(r.text_anchor_count()),
        method::SUMMARISE_TEXT => with(input, |(features, seed): (HostTensor, u64)| r.summarise_text(&features, seed)),
        method::PRIVACY => Outcome::value(r.privacy()),
        method::ANCHOR_COUNT => with(input, |frames: usize| Ok::<_, AnchorError>(r.anchor_count(frames))),
        other => Outcome::unknown(other),
    }
}

/// A library's reasoner, served.
pub(crate) struct Owned(pub(crate) Box<dyn AnchorReasoner>);

impl Serve for Owned {
    fn serve(&self, method: u32, input: &[u8], _args: Vec<Remote>) -> Outcome {
        serve(self.0.as_ref(), method, input)
    }
}

/// The host's reasoner, lent into a call.
pub(crate) struct Lent<'a>(pub(crate) &'a dyn AnchorReasoner);

impl Serve for Lent<'_> {
    fn serve(&self, method: u32, input: &[u8], _args: Vec<Remote>) -> Outcome {
        serve(self.0, method, input)
    }
}

/// An anchor reasoner on the other side of the boundary.
pub(crate) struct RemoteReasoner {
    proxy: Proxy,
    quantisation: Quantisation,
    text_anchors: usize,
    privacy: Option<SummaryPrivacy>,
}

impl RemoteReasoner {
    /// Wraps a served reasoner, reading what it answers without failing.
    pub(crate) fn new(proxy: Proxy) -> Result<Self, AnchorError> {
        let quantisation = proxy.call::<_, _, AnchorError>(method::QUANTISATION, &())?;
        let text_anchors = proxy.call::<_, _, AnchorError>(method::TEXT_ANCHOR_COUNT, &())?;
        let privacy = proxy.call::<_, _, AnchorError>(method::PRIVACY, &())?;
        Ok(Self { proxy, quantisation, text_anchors, privacy })
    }
}

impl AnchorReasoner for RemoteReasoner {
    fn select(&self, standardised: &HostTensor, seed: u64) -> Result<Vec<usize>, AnchorError> {
        self.proxy.call(method::SELECT, &(standardised, seed))
    }

    fn quantisation(&self) -> Quantisation {
        self.quantisation
    }

    fn summarise(
        &self,
        features: &HostTensor,
        reference: &FeatureStats,
        clips: usize,
        seed: u64,
    ) -> Result<AnchorSummary, AnchorError> {
        self.proxy.call(method::SUMMARISE, &(features, reference, clips, seed))
    }

    fn text_anchor_count(&self) -> usize {
        self.text_anchors
    }

    fn privacy(&self) -> Option<SummaryPrivacy> {
        self.privacy
    }

    fn anchor_count(&self, frames: usize) -> Option<usize> {
        // A reasoner that cannot answer is one whose count is not fixed: its summaries keep
        // their own counts.
        self.proxy.call::<_, _, AnchorError>(method::ANCHOR_COUNT, &frames).ok().flatten()
    }

    fn summarise_text(&self, text_features: &HostTensor, seed: u64) -> Result<Option<QuantisedTensor>, AnchorError> {
        self.proxy.call(method::SUMMARISE_TEXT, &(text_features, seed))
    }
}
