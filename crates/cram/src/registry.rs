//! Every compression method by the name configs and results use, one line
//! each in [`METHODS`]. A line says how to build the method from a
//! [`MethodOptions`]: the ratio, the recipe settings of the run, and the
//! method's own knobs (a JSON object, checked by the method's settings
//! type, whose `Default` is the one place its defaults live). A new method
//! is one file and one line here.

use std::rc::Rc;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::compressor::Compressor;
use crate::methods::attention_matching::{AttentionMatching, MatchedKeys, MatchingSettings};
use crate::methods::compress_evict::{CompressEvictSettings, CompressThenEvict};
use crate::methods::evict::Evict;
use crate::methods::fitted_recipe::FittedRecipe;
use crate::methods::hybrid::{Hybrid, HybridSettings};
use crate::methods::kvzip::KvZip;
use crate::methods::summary::{Summarize, SummarySettings};
use crate::recipe::init::Init;
use crate::recipe::pooling::Pooling;
use crate::recipe::Recipe;
use crate::scoring::{KeyNorm, Scorer, SnapKv, Streaming};
use crate::error::{Error, Result};

/// The methods, by name: a new method is one file and one line here.
pub const METHODS: &[Method] = &[
    Method { name: "surprisal", kind: Kind::Recipe(plain_recipe::<{ SURPRISAL }>) },
    Method { name: "uniform", kind: Kind::Recipe(plain_recipe::<{ UNIFORM }>) },
    Method { name: "hybrid", kind: Kind::WithRecipe(hybrid) },
    Method { name: "compress-evict", kind: Kind::WithRecipe(compress_evict) },
    Method { name: "snapkv", kind: Kind::Eviction(scorer::<SnapKv>) },
    Method { name: "key-norm", kind: Kind::Eviction(scorer::<KeyNorm>) },
    Method { name: "streaming", kind: Kind::Eviction(scorer::<Streaming>) },
    Method { name: "summary", kind: Kind::Other(summary) },
    Method { name: "attention-matching", kind: Kind::Other(attention_matching) },
    Method { name: "kvzip", kind: Kind::Other(kvzip) },
    Method { name: "fitted-recipe", kind: Kind::WithRecipe(fitted_recipe) },
];

/// One line of the registry.
#[derive(Debug, Clone, Copy)]
pub struct Method {
    /// The name in configs (`surprisal`, `snapkv`, ...).
    pub name: &'static str,
    /// What the method is, and how to build it.
    pub kind: Kind,
}

/// The kinds of method, each with its builder.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// A plain recipe: cells of one span can be optimised together
    /// ([`crate::recipe::compress_together`]).
    Recipe(fn(&MethodOptions) -> Result<Recipe>),
    /// A method that runs the recipe as one of its parts.
    WithRecipe(fn(&MethodOptions) -> Result<Box<dyn Compressor>>),
    /// Eviction of the span's real entries by a scorer, built from its knobs
    /// (also a starting point for the recipe: `init = "snapkv"`).
    Eviction(fn(&serde_json::Value) -> Result<Rc<dyn Scorer>>),
    /// Anything else.
    Other(fn(&MethodOptions) -> Result<Box<dyn Compressor>>),
}

impl Method {
    /// Builds the method for one cell; errors name the method.
    pub fn build(&self, options: &MethodOptions) -> Result<Box<dyn Compressor>> {
        let built = match self.kind {
            Kind::Recipe(recipe) => recipe(options).map(|recipe| Box::new(recipe) as Box<dyn Compressor>),
            Kind::WithRecipe(build) | Kind::Other(build) => build(options),
            Kind::Eviction(scorer) => scorer(&options.knobs).map(|scorer| Box::new(Evict { scorer, ratio: options.ratio }) as Box<dyn Compressor>),
        };
        built.map_err(|error| self.named(error))
    }

    /// The plain recipe this method runs, if it is one.
    pub fn recipe(&self, options: &MethodOptions) -> Option<Result<Recipe>> {
        match self.kind {
            Kind::Recipe(recipe) => Some(recipe(options).map_err(|error| self.named(error))),
            _ => None,
        }
    }

    /// Whether it runs the recipe, and so takes the recipe's options
    /// (`key_weight`, `init`, early stopping).
    pub fn optimizes(&self) -> bool {
        matches!(self.kind, Kind::Recipe(_) | Kind::WithRecipe(_))
    }

    fn named(&self, error: Error) -> Error {
        match error {
            Error::Invalid(reason) => Error::Invalid(format!("method {}: {reason}", self.name)),
            other => other,
        }
    }
}

/// What a method is built from.
#[derive(Debug, Clone)]
pub struct MethodOptions {
    /// Span tokens / entries kept.
    pub ratio: f64,
    /// The run's recipe at `ratio` (optimiser, positions, K term, start),
    /// for methods that run it; its pooling is the method's business.
    pub recipe: Recipe,
    /// The method's own settings, a JSON object (`{}` for the defaults).
    pub knobs: serde_json::Value,
}

impl MethodOptions {
    /// The published recipe at `ratio`, and the method's default knobs.
    pub fn new(ratio: f64) -> Self {
        Self { ratio, recipe: Recipe::published(ratio), knobs: serde_json::Value::Object(Default::default()) }
    }

    /// The knobs as the method's settings type (defaults for what is left
    /// out; an unknown key is an error).
    pub fn knobs<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(self.knobs.clone()).map_err(|e| Error::Invalid(e.to_string()))
    }
}

/// The registry line of `name`.
pub fn method(name: &str) -> Result<&'static Method> {
    METHODS.iter().find(|method| method.name == name).ok_or_else(|| {
        let known: Vec<&str> = METHODS.iter().map(|method| method.name).collect();
        Error::Invalid(format!("unknown method `{name}` (known: {})", known.join(", ")))
    })
}

/// Where the recipe starts, by name: `chunk-mean`, `random` (drawn with
/// `seed`), `attention-matching` (the reverse start: the tokens its
/// default fit keeps most, at their own positions), or the name of an
/// eviction method (the tokens it keeps, with its default knobs).
pub fn init(name: &str, seed: u64) -> Result<Init> {
    match name {
        "chunk-mean" => Ok(Init::ChunkMean),
        "random" => Ok(Init::Random { seed }),
        "attention-matching" => Ok(Init::Anchored(Rc::new(MatchedKeys::default()))),
        other => match method(other)?.kind {
            Kind::Eviction(scorer) => Ok(Init::Kept(scorer(&serde_json::json!({}))?)),
            _ => Err(Error::Invalid(format!("init `{other}`: not chunk-mean, random, attention-matching or an eviction method"))),
        },
    }
}

/// A method without knobs of its own.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoKnobs {}

const SURPRISAL: u8 = 0;
const UNIFORM: u8 = 1;

fn plain_recipe<const POOLING: u8>(options: &MethodOptions) -> Result<Recipe> {
    options.knobs::<NoKnobs>()?;
    let pooling = if POOLING == UNIFORM { Pooling::Uniform } else { Pooling::Surprisal };
    Ok(Recipe { pooling, ..options.recipe.clone() })
}

fn hybrid(options: &MethodOptions) -> Result<Box<dyn Compressor>> {
    let settings: HybridSettings = options.knobs()?;
    settings.validate()?;
    Ok(Box::new(Hybrid { settings, recipe: options.recipe.clone() }))
}

fn compress_evict(options: &MethodOptions) -> Result<Box<dyn Compressor>> {
    let settings: CompressEvictSettings = options.knobs()?;
    let method = CompressThenEvict { settings, recipe: options.recipe.clone(), ratio: options.ratio };
    method.validate()?;
    Ok(Box::new(method))
}

fn scorer<S: Scorer + DeserializeOwned + 'static>(knobs: &serde_json::Value) -> Result<Rc<dyn Scorer>> {
    let scorer: S = serde_json::from_value(knobs.clone()).map_err(|e| Error::Invalid(e.to_string()))?;
    scorer.validate()?;
    Ok(Rc::new(scorer))
}

fn attention_matching(options: &MethodOptions) -> Result<Box<dyn Compressor>> {
    let settings: MatchingSettings = options.knobs()?;
    settings.validate()?;
    Ok(Box::new(AttentionMatching { settings, ratio: options.ratio }))
}

fn fitted_recipe(options: &MethodOptions) -> Result<Box<dyn Compressor>> {
    let settings: MatchingSettings = options.knobs()?;
    settings.validate()?;
    Ok(Box::new(FittedRecipe { settings, recipe: options.recipe.clone() }))
}

fn kvzip(options: &MethodOptions) -> Result<Box<dyn Compressor>> {
    Ok(Box::new(KvZip { settings: options.knobs()?, ratio: options.ratio }))
}

fn summary(options: &MethodOptions) -> Result<Box<dyn Compressor>> {
    let settings: SummarySettings = options.knobs()?;
    settings.validate()?;
    Ok(Box::new(Summarize { ratio: options.ratio, settings }))
}
