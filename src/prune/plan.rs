//! Width plans: how many channels each dependency group keeps, as a small text file that
//! `sensitivity --threshold` (and the searches) write and `prune --plan` applies.
//!
//! ```text
//! # sparseconv width plan
//! arch minkunet
//! group stem.0.kernel 16 of 16
//! group stem.3.kernel 8 of 16
//! ```
//!
//! Each group is named by the first tensor that produces it ([`Group::name`]) and records the
//! width it had, so a plan made for another network (other widths or architecture) is refused
//! rather than applied to whatever groups happen to match.

use std::fmt::Write as _;
use std::path::Path;

use super::groups::Group;
use crate::error::{Error, Result};
use crate::nn::arch::ArchKind;

/// Kept channels per group, for one network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WidthPlan {
    /// Architecture the plan was made for.
    pub arch: ArchKind,
    /// `(group name, kept, width before)` in group order.
    pub groups: Vec<(String, usize, usize)>,
}

impl WidthPlan {
    /// The plan keeping `widths[g]` channels of every group of `groups`.
    pub fn new(arch: ArchKind, groups: &[Group], widths: &[usize]) -> Result<Self> {
        if widths.len() != groups.len() {
            return Err(Error::invalid("width plan", format!("{} widths for {} groups", widths.len(), groups.len())));
        }
        Ok(Self { arch, groups: groups.iter().zip(widths).map(|(g, &w)| (g.name().to_string(), w, g.width)).collect() })
    }

    /// The plan as text.
    pub fn to_text(&self) -> String {
        let mut s = format!("# sparseconv width plan\narch {}\n", self.arch.name());
        for (name, kept, of) in &self.groups {
            let _ = writeln!(s, "group {name} {kept} of {of}");
        }
        s
    }

    /// Write the plan.
    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_text()).map_err(|e| Error::io(path, e))
    }

    /// Read a plan, checking its syntax (not yet the network: see [`WidthPlan::widths`]).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text).map_err(|m| Error::format(path, m))
    }

    fn parse(text: &str) -> std::result::Result<Self, String> {
        let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'));
        let arch = match lines.next() {
            Some((_, l)) => match l.split_whitespace().collect::<Vec<_>>()[..] {
                ["arch", a] => ArchKind::parse(a).map_err(|e| e.to_string())?,
                _ => return Err(format!("expected `arch NAME` first, got `{l}`")),
            },
            None => return Err("empty width plan".into()),
        };
        let mut groups = Vec::new();
        for (i, l) in lines {
            let bad = || format!("line {}: expected `group NAME KEPT of WIDTH`, got `{l}`", i + 1);
            match l.split_whitespace().collect::<Vec<_>>()[..] {
                ["group", name, kept, "of", of] => {
                    let kept: usize = kept.parse().map_err(|_| bad())?;
                    let of: usize = of.parse().map_err(|_| bad())?;
                    if kept == 0 || kept > of {
                        return Err(format!("line {}: group `{name}` keeps {kept} of {of} channels", i + 1));
                    }
                    groups.push((name.to_string(), kept, of));
                }
                _ => return Err(bad()),
            }
        }
        Ok(Self { arch, groups })
    }

    /// Kept widths in `groups` order, checking that the plan was made for this network.
    pub fn widths(&self, arch: ArchKind, groups: &[Group]) -> Result<Vec<usize>> {
        let other = |why: String| Error::invalid("--plan", format!("the plan is for another network: {why}"));
        if arch != self.arch {
            return Err(other(format!("made for {}, the model is {}", self.arch.name(), arch.name())));
        }
        if self.groups.len() != groups.len() {
            return Err(other(format!("{} groups, the model has {}", self.groups.len(), groups.len())));
        }
        groups
            .iter()
            .zip(&self.groups)
            .map(|(g, (name, kept, of))| {
                if g.name() != name || g.width != *of {
                    return Err(other(format!(
                        "group `{name}` of {of} channels, the model has `{}` of {}",
                        g.name(),
                        g.width
                    )));
                }
                if !g.prunable && kept != of {
                    return Err(Error::invalid("--plan", format!("group `{name}` cannot be pruned")));
                }
                Ok(*kept)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_and_bad_lines_name_themselves() {
        let p = WidthPlan { arch: ArchKind::MinkUNet, groups: vec![("stem.0.kernel".into(), 8, 16)] };
        assert_eq!(WidthPlan::parse(&p.to_text()), Ok(p));
        let e = WidthPlan::parse("arch minkunet\ngroup a 17 of 16\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("17 of 16"), "{e}");
        assert!(WidthPlan::parse("group a 1 of 2").unwrap_err().contains("arch"));
        assert!(WidthPlan::parse("arch minkunet\ngroup a x of 2").unwrap_err().contains("expected `group"));
    }
}
