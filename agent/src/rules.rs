//! Include/exclude rules of a replication set, matched against paths relative to the
//! set's root.

use std::path::Path;

use anyhow::{Context, Result};
use globset::{Glob, GlobSet, GlobSetBuilder};

#[derive(Debug, Clone)]
pub struct Rules {
    include: GlobSet,
    exclude: GlobSet,
}

fn build(patterns: &[String]) -> Result<GlobSet> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        let glob = globset::GlobBuilder::new(p)
            .literal_separator(true)
            .build()
            .or_else(|_| Glob::new(p))
            .with_context(|| format!("{p:?} is not a valid glob (see https://docs.rs/globset)"))?;
        b.add(glob);
    }
    Ok(b.build()?)
}

impl Rules {
    pub fn new(include: &[String], exclude: &[String]) -> Result<Rules> {
        Ok(Rules {
            include: build(include)?,
            exclude: build(exclude)?,
        })
    }

    /// Whether `rel` or one of its parent directories is excluded.
    fn excluded(&self, rel: &Path) -> bool {
        rel.ancestors()
            .filter(|a| !a.as_os_str().is_empty())
            .any(|a| self.exclude.is_match(a))
    }

    /// Whether a directory at `rel` is replicated (it is, unless excluded).
    pub fn dir(&self, rel: &Path) -> bool {
        !self.excluded(rel)
    }

    /// Whether a non-directory at `rel` is replicated.
    pub fn file(&self, rel: &Path) -> bool {
        self.include.is_match(rel) && !self.excluded(rel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(inc: &[&str], exc: &[&str]) -> Rules {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Rules::new(&s(inc), &s(exc)).unwrap()
    }

    #[test]
    fn include_and_exclude() {
        let r = rules(&["**"], &["**/*.tmp", "cache"]);
        assert!(r.file(Path::new("a/b.txt")));
        assert!(!r.file(Path::new("a/b.tmp")));
        assert!(!r.file(Path::new("cache/x")));
        assert!(!r.dir(Path::new("cache")));
        assert!(r.dir(Path::new("cachet")));
        let r = rules(&["*.db", "**/*.db"], &[]);
        assert!(r.file(Path::new("x.db")));
        assert!(r.file(Path::new("d/x.db")));
        assert!(!r.file(Path::new("x.log")));
    }

    #[test]
    fn a_bad_glob_is_an_error() {
        assert!(Rules::new(&["a[".into()], &[]).is_err());
    }
}
