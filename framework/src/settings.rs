//! Plugin and deployment settings: serde structs whose every numeric key declares its valid
//! range. The ranges are checked once, by one mechanism, at `mmpg validate` time (with the key's
//! file, line and path) and again before a plugin is built, so `run` never receives a value that
//! `validate` accepted and a plugin would refuse or mangle.

use std::fmt;
use std::ops::RangeInclusive;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A settings value that does not fit the plugin's settings struct or its declared ranges.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Deserialize, Serialize)]
#[error("{path}: {message}")]
pub struct SettingsError {
    /// Key path inside the plugin's settings table (`k`, `layers[2].width`); empty for the table.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// A plugin's (or a deployment section's) settings: every key with its default, and the valid
/// range of every numeric key.
///
/// Required: [`Settings::check`], which declares the ranges by calling [`Check`]'s methods with
/// each key. Data sources also give [`Settings::clip_bytes`] so `validate` can estimate a
/// deployment's memory.
pub trait Settings: Default + Serialize + DeserializeOwned {
    /// Declares the valid range of every numeric setting, and any rule between settings.
    fn check(&self, check: &mut Check);

    /// Data sources: bytes one clip occupies in memory (frames as f32 plus its text), for the
    /// memory estimate of `mmpg validate`; `None` when unknown.
    fn clip_bytes(&self) -> Option<u64> {
        None
    }
}

/// Collects range violations, each with its key.
#[derive(Debug, Default)]
pub struct Check {
    errors: Vec<SettingsError>,
}

impl Check {
    /// An empty check.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a violation of a rule the other methods do not express.
    pub fn fail(&mut self, key: &str, message: impl Into<String>) {
        self.errors.push(SettingsError { path: key.to_string(), message: message.into() });
    }

    /// An integer (or any ordered value) within `range`, bounds included.
    pub fn within<T: PartialOrd + fmt::Display>(&mut self, key: &str, value: T, range: RangeInclusive<T>) {
        if !range.contains(&value) {
            self.fail(key, format!("expected {}..={}, found {value}", range.start(), range.end()));
        }
    }

    /// A finite real within `range`, bounds included (NaN and infinities are always out).
    pub fn real(&mut self, key: &str, value: f64, range: RangeInclusive<f64>) {
        if !(value.is_finite() && range.contains(&value)) {
            self.fail(key, format!("expected a finite number in {}..={}, found {value}", range.start(), range.end()));
        }
    }

    /// A finite real in `(0, max]`: learning rates, bounds, temperatures.
    pub fn positive(&mut self, key: &str, value: f64, max: f64) {
        if !(value.is_finite() && value > 0.0 && value <= max) {
            self.fail(key, format!("expected a finite number in (0, {max}], found {value}"));
        }
    }

    /// The violations found, in the order they were declared.
    pub fn into_errors(self) -> Vec<SettingsError> {
        self.errors
    }
}

/// Deserialises a plugin's settings table into its struct and checks its declared ranges,
/// reporting the key path of the first problem.
pub fn parse_settings<S: Settings>(table: &toml::Table) -> Result<S, SettingsError> {
    let settings = deserialise::<S>(table)?;
    match check_ranges(&settings).into_iter().next() {
        Some(e) => Err(e),
        None => Ok(settings),
    }
}

/// Every range violation of `settings`.
pub fn check_ranges<S: Settings>(settings: &S) -> Vec<SettingsError> {
    let mut check = Check::new();
    settings.check(&mut check);
    check.into_errors()
}

fn deserialise<S: DeserializeOwned>(table: &toml::Table) -> Result<S, SettingsError> {
    let (settings, mut errors) = deserialise_all::<S>(toml::Value::Table(table.clone()));
    match settings {
        Some(s) if errors.is_empty() => Ok(s),
        _ => Err(errors.remove(0)),
    }
}

/// Most keys one value may have wrong before the rest go unreported.
const MAX_KEY_ERRORS: usize = 64;

/// Deserialises `value` into `S`; when a key is unknown or does not fit, records the problem,
/// drops that key and tries again, so that one typo does not hide the problems of the other
/// keys. Returns the value built from what remained (defaults for the dropped keys), if any,
/// and every problem, each with its key path (`training.latnet`, `shifts[2].severity`).
pub fn deserialise_all<S: DeserializeOwned>(mut value: toml::Value) -> (Option<S>, Vec<SettingsError>) {
    let mut errors = Vec::new();
    while errors.len() < MAX_KEY_ERRORS {
        let e = match serde_path_to_error::deserialize::<_, S>(value.clone()) {
            Ok(settings) => return (Some(settings), errors),
            Err(e) => e,
        };
        let mut segments: Vec<serde_path_to_error::Segment> = e.path().iter().cloned().collect();
        let path = e.path().to_string().replace('?', "");
        let message = e.into_inner().message().trim().to_string();
        // Unknown fields are reported at their parent table, or at themselves.
        if let Some(field) = unknown_field(&message) {
            let at_field = matches!(segments.last(), Some(serde_path_to_error::Segment::Map { key }) if *key == field);
            if !at_field {
                segments.push(serde_path_to_error::Segment::Map { key: field });
            }
        }
        errors.push(SettingsError { path: if path == "." { String::new() } else { path }, message });
        if !remove_key(&mut value, &segments) {
            break;
        }
    }
    (None, errors)
}

/// The field an "unknown field `x`, expected …" message names.
pub(crate) fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

/// Removes the table key `path` leads to; false when it cannot (array elements are kept, so
/// later paths keep their indices).
fn remove_key(value: &mut toml::Value, path: &[serde_path_to_error::Segment]) -> bool {
    use serde_path_to_error::Segment;
    let Some((last, parents)) = path.split_last() else { return false };
    let mut node = value;
    for segment in parents {
        let next = match segment {
            Segment::Map { key } => node.as_table_mut().and_then(|t| t.get_mut(key)),
            Segment::Seq { index } => node.as_array_mut().and_then(|a| a.get_mut(*index)),
            _ => None,
        };
        match next {
            Some(n) => node = n,
            None => return false,
        }
    }
    match (last, node.as_table_mut()) {
        (Segment::Map { key }, Some(table)) => table.remove(key).is_some(),
        _ => false,
    }
}

fn defaults_of<S: Settings>() -> toml::Table {
    toml::Table::try_from(S::default()).unwrap_or_default()
}

fn check_of<S: Settings>(table: &toml::Table) -> Result<(), Vec<SettingsError>> {
    let (settings, mut errors) = deserialise_all::<S>(toml::Value::Table(table.clone()));
    if let Some(settings) = settings {
        errors.extend(check_ranges(&settings));
    }
    if errors.is_empty() { Ok(()) } else { Err(errors) }
}

fn clip_bytes_of<S: Settings>(table: &toml::Table) -> Option<u64> {
    deserialise::<S>(table).ok()?.clip_bytes()
}

/// A plugin's settings type, seen from outside so that it can be listed (`mmpg plugins`) and
/// checked (`mmpg validate`) without building the plugin: through function pointers for a
/// statically linked plugin, through its library for a loaded one.
#[derive(Clone)]
pub struct SettingsSpec(SpecKind);

#[derive(Clone)]
enum SpecKind {
    Static {
        defaults: fn() -> toml::Table,
        check: fn(&toml::Table) -> Result<(), Vec<SettingsError>>,
        clip_bytes: fn(&toml::Table) -> Option<u64>,
    },
    Dynamic(std::sync::Arc<dyn SettingsOracle>),
}

/// What a [`SettingsSpec`] answers, for settings whose type lives elsewhere (a plugin library).
pub trait SettingsOracle: Send + Sync {
    /// The default settings: every key the plugin accepts, with its default.
    fn defaults(&self) -> toml::Table;
    /// Checks a table without building anything.
    fn check(&self, table: &toml::Table) -> Result<(), Vec<SettingsError>>;
    /// Bytes per clip of a data source with these settings.
    fn clip_bytes(&self, table: &toml::Table) -> Option<u64>;
}

impl SettingsSpec {
    /// The spec of a settings struct (which should use `deny_unknown_fields`).
    pub const fn of<S: Settings>() -> Self {
        Self(SpecKind::Static { defaults: defaults_of::<S>, check: check_of::<S>, clip_bytes: clip_bytes_of::<S> })
    }

    /// The spec of settings answered by `oracle` (e.g. a loaded library).
    pub fn dynamic(oracle: std::sync::Arc<dyn SettingsOracle>) -> Self {
        Self(SpecKind::Dynamic(oracle))
    }

    /// The default settings as a TOML table: every key the plugin accepts, with its default.
    pub fn defaults(&self) -> toml::Table {
        match &self.0 {
            SpecKind::Static { defaults, .. } => defaults(),
            SpecKind::Dynamic(oracle) => oracle.defaults(),
        }
    }

    /// Checks a table without building anything: deserialisation, then every declared range.
    ///
    /// # Errors
    /// Every problem found, each with its key path inside the table.
    pub fn check(&self, table: &toml::Table) -> Result<(), Vec<SettingsError>> {
        match &self.0 {
            SpecKind::Static { check, .. } => check(table),
            SpecKind::Dynamic(oracle) => oracle.check(table),
        }
    }

    /// Bytes per clip of a data source with these settings (see [`Settings::clip_bytes`]).
    pub fn clip_bytes(&self, table: &toml::Table) -> Option<u64> {
        match &self.0 {
            SpecKind::Static { clip_bytes, .. } => clip_bytes(table),
            SpecKind::Dynamic(oracle) => oracle.clip_bytes(table),
        }
    }
}

impl fmt::Debug for SettingsSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.defaults().iter()).finish()
    }
}

/// Settings of a plugin that takes none.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoSettings {}

impl Settings for NoSettings {
    fn check(&self, _check: &mut Check) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Default, Serialize, serde::Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Knobs {
        k: u32,
        rate: f64,
        name: String,
    }

    impl Settings for Knobs {
        fn check(&self, check: &mut Check) {
            check.within("k", self.k, 1..=8);
            check.positive("rate", self.rate, 1.0);
        }
    }

    #[test]
    fn settings_errors_name_the_key() {
        let table: toml::Table = toml::from_str("k = \"eight\"").expect("toml");
        let err = parse_settings::<Knobs>(&table).expect_err("wrong type");
        assert_eq!(err.path, "k");
        assert!(err.message.contains("invalid type"), "{}", err.message);
        let table: toml::Table = toml::from_str("kk = 1").expect("toml");
        let err = parse_settings::<Knobs>(&table).expect_err("unknown key");
        assert!(err.message.contains("unknown field `kk`"), "{}", err.message);
    }

    #[test]
    fn every_range_violation_is_listed_with_its_key() {
        let table: toml::Table = toml::from_str("k = 0\nrate = nan").expect("toml");
        let errors = SettingsSpec::of::<Knobs>().check(&table).expect_err("both out of range");
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["k", "rate"]);
        assert_eq!(errors[0].message, "expected 1..=8, found 0");
        assert_eq!(errors[1].message, "expected a finite number in (0, 1], found NaN");
        // The build path refuses what validate refuses.
        assert_eq!(parse_settings::<Knobs>(&table).expect_err("refused"), errors[0]);
    }

    #[test]
    fn a_wrong_key_does_not_hide_the_others() {
        // A typo, a wrong type and an out-of-range value: all three are reported at once.
        let table: toml::Table = toml::from_str("kk = 1\nname = 3\nk = 0\nrate = 0.5").expect("toml");
        let errors = SettingsSpec::of::<Knobs>().check(&table).expect_err("three problems");
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["kk", "name", "k"], "{errors:?}");
        assert!(errors[0].message.starts_with("unknown field `kk`"), "{errors:?}");
    }

    #[test]
    fn defaults_list_every_key() {
        let keys: Vec<String> = SettingsSpec::of::<Knobs>().defaults().keys().cloned().collect();
        assert_eq!(keys, ["k", "name", "rate"]);
    }

    proptest! {
        #[test]
        fn a_real_passes_exactly_when_finite_and_in_range(x in prop_oneof![
            Just(f64::NAN), Just(f64::INFINITY), Just(f64::NEG_INFINITY), -10.0..10.0f64
        ]) {
            let mut check = Check::new();
            check.real("x", x, -1.0..=1.0);
            check.positive("y", x, 1.0);
            let errors = check.into_errors();
            prop_assert_eq!(errors.iter().any(|e| e.path == "x"), !(x.is_finite() && (-1.0..=1.0).contains(&x)));
            prop_assert_eq!(errors.iter().any(|e| e.path == "y"), !(x.is_finite() && x > 0.0 && x <= 1.0));
        }

        #[test]
        fn an_integer_passes_exactly_when_in_range(k in 0usize..20, lo in 0usize..10, len in 0usize..10) {
            let mut check = Check::new();
            check.within("k", k, lo..=lo + len);
            prop_assert_eq!(check.into_errors().is_empty(), (lo..=lo + len).contains(&k));
        }
    }
}
