//! Logging for both daemons: `tracing` to stderr, human-readable by default or one JSON
//! object per line, at the level the `[log]` table or `RUST_LOG` sets (`RUST_LOG` wins,
//! so an operator can raise it for one run without editing the config).

use serde::Deserialize;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// The `[log]` table of either daemon's config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter: `info` (default), `debug`, `doppel_agent=debug,warn`, ...
    pub level: Option<String>,
}

/// Installs the global subscriber. Errors name the bad filter.
pub fn init(cfg: &LogConfig) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = match EnvFilter::try_from_default_env() {
        Ok(f) => f,
        Err(_) => {
            let level = cfg.level.as_deref().unwrap_or("info");
            check_level(level)?;
            EnvFilter::try_new(level).map_err(|e| {
                anyhow::anyhow!(
                    "[log] level = {level:?} is not a valid filter ({e}); write e.g. \"info\" or \"doppel_agent=debug,info\""
                )
            })?
        }
    };
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let r = match cfg.format {
        LogFormat::Human => b.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => b.json().with_current_span(false).try_init(),
    };
    r.map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))
}

const LEVELS: &[&str] = &["off", "error", "warn", "info", "debug", "trace"];

/// `tracing` reads any bare word as a target name, so a misspelt level would silently
/// log nothing: every directive must be a level or `target=level`.
fn check_level(filter: &str) -> anyhow::Result<()> {
    for d in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = d.rsplit_once('=').map_or(d, |(_, l)| l);
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            anyhow::bail!(
                "[log] level = {filter:?}: {d:?} names no level; use one of {} or target=level, e.g. \"doppel_agent=debug,info\"",
                LEVELS.join(", ")
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_table_parses_and_rejects_unknown_keys() {
        #[derive(Deserialize)]
        struct C {
            log: LogConfig,
        }
        let c: C = toml_like(r#"{"log":{"format":"json","level":"debug"}}"#);
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.log.level.as_deref(), Some("debug"));
        assert!(serde_json::from_str::<C>(r#"{"log":{"colour":"x"}}"#).is_err());
        assert!(serde_json::from_str::<C>(r#"{"log":{"format":"xml"}}"#).is_err());
    }

    #[test]
    fn misspelt_levels_are_refused() {
        assert!(check_level("info").is_ok());
        assert!(check_level("doppel_agent=debug,WARN").is_ok());
        assert!(check_level("inof").is_err());
        assert!(check_level("doppel_agent=loud").is_err());
    }

    fn toml_like<T: serde::de::DeserializeOwned>(s: &str) -> T {
        serde_json::from_str(s).unwrap()
    }
}
