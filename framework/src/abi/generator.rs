//! The parameter generator across the boundary: a library's generator served and proxied. Its
//! training borrows the host's model, data source, anchor reasoner and progress, lent into the
//! call.

use std::sync::{Mutex, PoisonError};

use super::ffi::{self, Remote};
use super::host::{LentData, LentProgress, RemoteData, RemoteProgress};
use super::model::{LentCloud, RemoteCloud};
use super::proxy::Proxy;
use super::reasoner::{Lent as LentReasoner, RemoteReasoner};
use super::serve::{Outcome, Serve, with};
use crate::TrainingLog;
use crate::anchor::AnchorSummary;
use crate::data::DomainSpec;
use crate::generator::{GeneratorError, GeneratorTraining, ParameterGenerator};
use crate::model::TrainingPlan;
use crate::slots::{GeneratedParams, SlotSchema};

/// Generator methods.
mod method {
    /// `()` → `(SlotSchema, String)`: schema and name.
    pub const DESCRIBE: u32 = 1;
    /// `Vec<AnchorSummary>` → `Vec<GeneratedParams>`.
    pub const GENERATE_BATCH: u32 = 2;
    /// `(Vec<DomainSpec>, usize, TrainingPlan)`, args `[model, data, reasoner, progress]` →
    /// `TrainingLog`.
    pub const TRAIN: u32 = 3;
    /// `()` → `usize`.
    pub const PARAMETER_COUNT: u32 = 4;
    /// `()` → `Vec<u8>`.
    pub const SAVE: u32 = 5;
    /// `Vec<u8>` → `()`.
    pub const LOAD: u32 = 6;
    /// `AnchorSummary` → `GeneratedParams`.
    pub const GENERATE: u32 = 7;
}

/// A library's generator, served.
pub(crate) struct OwnedGenerator(pub(crate) Mutex<Box<dyn ParameterGenerator>>);

fn boundary(what: &str, e: impl std::fmt::Display) -> GeneratorError {
    GeneratorError::Plugin(format!("the host's {what}: {e}"))
}

fn train(g: &mut dyn ParameterGenerator, input: &[u8], args: Vec<Remote>) -> Outcome {
    let mut args = args.into_iter();
    let (Some(model), Some(data), Some(reasoner), Some(progress)) =
        (args.next(), args.next(), args.next(), args.next())
    else {
        return Outcome::missing_argument("model, data source, anchor reasoner and progress");
    };
    let parts = (|| {
        let model = RemoteCloud::new(Proxy::new(model, "the host's model")).map_err(|e| boundary("model", e))?;
        let data =
            RemoteData::new(Proxy::new(data, "the host's data source")).map_err(|e| boundary("data source", e))?;
        let reasoner = RemoteReasoner::new(Proxy::new(reasoner, "the host's anchor reasoner"))
            .map_err(|e| boundary("anchor reasoner", e))?;
        Ok::<_, GeneratorError>((model, data, reasoner))
    })();
    let (model, data, reasoner) = match parts {
        Ok(p) => p,
        Err(e) => return Outcome::of::<(), _>(Err(e)),
    };
    let progress = RemoteProgress(Proxy::new(progress, "the host's progress"));
    with(input, |(domains, window_clips, plan): (Vec<DomainSpec>, usize, TrainingPlan)| {
        g.train(&GeneratorTraining {
            model: &model,
            data: &data,
            domains: &domains,
            reasoner: &reasoner,
            window_clips,
            plan,
            progress: &progress,
        })
    })
}

impl Serve for OwnedGenerator {
    fn serve(&self, method: u32, input: &[u8], args: Vec<Remote>) -> Outcome {
        let mut g = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match method {
            method::DESCRIBE => Outcome::value((g.schema(), g.name())),
            method::GENERATE_BATCH => with(input, |summaries: Vec<AnchorSummary>| g.generate_batch(&summaries)),
            method::TRAIN => train(g.as_mut(), input, args),
            method::PARAMETER_COUNT => Outcome::value(g.parameter_count()),
            method::SAVE => Outcome::of(g.save()),
            method::LOAD => with(input, |bytes: Vec<u8>| g.load(&bytes)),
            method::GENERATE => with(input, |summary: AnchorSummary| g.generate(&summary)),
            other => Outcome::unknown(other),
        }
    }
}

/// A generator on the other side of the boundary.
pub(crate) struct RemoteGenerator {
    proxy: Proxy,
    schema: SlotSchema,
    name: String,
}

impl RemoteGenerator {
    pub(crate) fn new(proxy: Proxy) -> Result<Self, GeneratorError> {
        let (schema, name) = proxy.call::<_, _, GeneratorError>(method::DESCRIBE, &())?;
        Ok(Self { proxy, schema, name })
    }
}

impl ParameterGenerator for RemoteGenerator {
    fn schema(&self) -> &SlotSchema {
        &self.schema
    }

    fn generate_batch(&self, summaries: &[AnchorSummary]) -> Result<Vec<GeneratedParams>, GeneratorError> {
        self.proxy.call(method::GENERATE_BATCH, summaries)
    }

    fn train(&mut self, ctx: &GeneratorTraining<'_>) -> Result<TrainingLog, GeneratorError> {
        let lent: [&dyn Serve; 4] =
            [&LentCloud(ctx.model), &LentData(ctx.data), &LentReasoner(ctx.reasoner), &LentProgress(ctx.progress)];
        ffi::with_lent(&lent, |args| {
            self.proxy.call_with(method::TRAIN, &(ctx.domains, ctx.window_clips, &ctx.plan), args)
        })
    }

    fn parameter_count(&self) -> usize {
        self.proxy.call::<_, _, GeneratorError>(method::PARAMETER_COUNT, &()).unwrap_or(0)
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn save(&self) -> Result<Vec<u8>, GeneratorError> {
        self.proxy.call(method::SAVE, &())
    }

    fn load(&mut self, bytes: &[u8]) -> Result<(), GeneratorError> {
        self.proxy.call(method::LOAD, bytes)
    }

    fn generate(&self, summary: &AnchorSummary) -> Result<GeneratedParams, GeneratorError> {
        self.proxy.call(method::GENERATE, summary)
    }
}
