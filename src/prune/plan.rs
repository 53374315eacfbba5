//! Width plans: how many channels each dependency group keeps, and optionally finer cuts per
//! conv (offsets removed, or the kernel in a sparse format), as a small text file that
//! `sensitivity --threshold` (and the searches) write and `prune --plan` applies.
//!
//! ```text
//! # sparseconv width plan
//! arch minkunet
//! group stem.0.kernel 16 of 16
//! group stem.3.kernel 8 of 16
//! conv stage1.1.net.0.kernel offsets 14 of 27
//! conv up1.1.0.net.0.kernel sparse element 0.8
//! ```
//!
//! Each group is named by the first tensor that produces it ([`Group::name`]) and records the
//! width it had, so a plan made for another network (other widths or architecture) is refused
//! rather than applied to whatever groups happen to match.

use std::fmt::Write as _;
use std::path::Path;

use super::groups::Group;
use crate::error::{Error, Result};
use crate::nn::arch::{ArchKind, NetDesc};
use crate::sparse_weights::Format;

/// A finer cut of one conv, applied after the channel widths.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ConvCut {
    /// Keep this many of the conv's kernel offsets (the largest by L1).
    Offsets {
        /// Offsets kept.
        kept: usize,
        /// The conv's kernel volume.
        of: usize,
    },
    /// Zero this fraction of the kernel's weights by magnitude and keep it in `format`.
    Sparse(Format, f64),
}

impl ConvCut {
    /// `offsets KEPT of VOLUME` or `sparse FORMAT FRACTION`.
    pub fn to_text(self) -> String {
        match self {
            ConvCut::Offsets { kept, of } => format!("offsets {kept} of {of}"),
            ConvCut::Sparse(f, s) => format!("sparse {} {s}", f.name()),
        }
    }

    /// Parse [`ConvCut::to_text`]'s words.
    pub fn parse(words: &[&str]) -> std::result::Result<Self, String> {
        match *words {
            ["offsets", kept, "of", of] => {
                let kept: usize = kept.parse().map_err(|_| format!("offsets kept `{kept}` is not a count"))?;
                let of: usize = of.parse().map_err(|_| format!("kernel volume `{of}` is not a count"))?;
                if kept == 0 || kept > of {
                    return Err(format!("keeps {kept} of {of} offsets"));
                }
                Ok(ConvCut::Offsets { kept, of })
            }
            ["sparse", format, fraction] => {
                let f = Format::parse(format).map_err(|e| e.to_string())?;
                let s: f64 = fraction.parse().map_err(|_| format!("sparsity `{fraction}` is not a number"))?;
                if !(0.0..1.0).contains(&s) {
                    return Err(format!("sparsity {s} is not in [0, 1)"));
                }
                Ok(ConvCut::Sparse(f, s))
            }
            _ => {
                Err(format!("expected `offsets KEPT of VOLUME` or `sparse FORMAT FRACTION`, got `{}`", words.join(" ")))
            }
        }
    }
}

/// Kept channels per group, for one network.
#[derive(Debug, Clone, PartialEq)]
pub struct WidthPlan {
    /// Architecture the plan was made for.
    pub arch: ArchKind,
    /// `(group name, kept, width before)` in group order.
    pub groups: Vec<(String, usize, usize)>,
    /// Finer cuts by conv kernel name, applied after the widths (empty for a pure width plan).
    pub convs: Vec<(String, ConvCut)>,
}

impl WidthPlan {
    /// The plan keeping `widths[g]` channels of every group of `groups`.
    pub fn new(arch: ArchKind, groups: &[Group], widths: &[usize]) -> Result<Self> {
        if widths.len() != groups.len() {
            return Err(Error::invalid("width plan", format!("{} widths for {} groups", widths.len(), groups.len())));
        }
        Ok(Self {
            arch,
            groups: groups.iter().zip(widths).map(|(g, &w)| (g.name().to_string(), w, g.width)).collect(),
            convs: Vec::new(),
        })
    }

    /// Whether the plan keeps every channel.
    pub fn keeps_all_channels(&self) -> bool {
        self.groups.iter().all(|g| g.1 == g.2)
    }

    /// Check the conv cuts against the network: every named conv exists, an offset cut names
    /// its kernel volume, a sparse cut's format fits the conv.
    pub fn check_convs(&self, desc: &NetDesc) -> Result<()> {
        let convs = desc.convs();
        for (name, cut) in &self.convs {
            let c = convs.iter().find(|c| &c.kernel == name).ok_or_else(|| {
                Error::invalid(
                    "--plan",
                    format!("the plan is for another network: it cuts `{name}`, which the model lacks"),
                )
            })?;
            match *cut {
                ConvCut::Offsets { of, .. } if of != c.spec.volume() => {
                    return Err(Error::invalid(
                        "--plan",
                        format!("the plan is for another network: `{name}` has {} offsets, not {of}", c.spec.volume()),
                    ))
                }
                ConvCut::Sparse(Format::Block, _) if !c.cout.is_multiple_of(crate::sparse_weights::BLOCK) => {
                    return Err(Error::invalid(
                        "--plan",
                        format!("`{name}`: Cout = {} is not a multiple of 16", c.cout),
                    ))
                }
                ConvCut::Sparse(Format::NM(_, m), _) if !c.cin.is_multiple_of(m as usize) => {
                    return Err(Error::invalid("--plan", format!("`{name}`: M = {m} does not divide Cin = {}", c.cin)))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The plan as text.
    pub fn to_text(&self) -> String {
        let mut s = format!("# sparseconv width plan\narch {}\n", self.arch.name());
        for (name, kept, of) in &self.groups {
            let _ = writeln!(s, "group {name} {kept} of {of}");
        }
        for (name, cut) in &self.convs {
            let _ = writeln!(s, "conv {name} {}", cut.to_text());
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
        let mut convs = Vec::new();
        for (i, l) in lines {
            let bad = || {
                format!(
                    "line {}: expected `group NAME KEPT of WIDTH`, `conv NAME offsets KEPT of VOLUME` or `conv NAME sparse FORMAT FRACTION`, got `{l}`",
                    i + 1
                )
            };
            match l.split_whitespace().collect::<Vec<_>>()[..] {
                ["conv", name, ref cut @ ..] => {
                    let cut = ConvCut::parse(cut).map_err(|e| format!("line {}: conv `{name}`: {e}", i + 1))?;
                    convs.push((name.to_string(), cut));
                }
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
        Ok(Self { arch, groups, convs })
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
        let p = WidthPlan {
            arch: ArchKind::MinkUNet,
            groups: vec![("stem.0.kernel".into(), 8, 16)],
            convs: vec![
                ("a.kernel".into(), ConvCut::Offsets { kept: 14, of: 27 }),
                ("b.kernel".into(), ConvCut::Sparse(Format::Element, 0.8)),
            ],
        };
        assert_eq!(WidthPlan::parse(&p.to_text()), Ok(p));
        assert!(WidthPlan::parse("arch minkunet\nconv a offsets 28 of 27\n").unwrap_err().contains("28 of 27"));
        assert!(WidthPlan::parse("arch minkunet\nconv a sparse element 1.5\n").unwrap_err().contains("1.5"));
        let e = WidthPlan::parse("arch minkunet\ngroup a 17 of 16\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("17 of 16"), "{e}");
        assert!(WidthPlan::parse("group a 1 of 2").unwrap_err().contains("arch"));
        assert!(WidthPlan::parse("arch minkunet\ngroup a x of 2").unwrap_err().contains("expected `group"));
    }
}
