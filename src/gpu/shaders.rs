//! The WGSL shader registry: one file per kernel family in `shaders/`, embedded at build time,
//! and the pipeline-cache key (shader, entry point, specialization).

/// A kernel family (one WGSL file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shader {
    /// `shaders/kmap_hash.wgsl`: hash-table insert and neighbour queries.
    KmapHash,
    /// `shaders/conv.wgsl`: output-stationary implicit-GEMM convolution.
    Conv,
    /// `shaders/scan.wgsl`: exclusive prefix sums (reduce-then-scan).
    Scan,
    /// `shaders/radix_sort.wgsl`: one pass of a stable radix sort of u32-pair keys.
    RadixSort,
    /// `shaders/kmap_sort.wgsl`: packed keys, binary-search queries, unique parents.
    KmapSort,
    /// `shaders/elementwise.wgsl`: channel concat, f32 -> packed f16, voxel pruning's row sums
    /// and fill.
    Elementwise,
    /// `shaders/nbr_table.wgsl`: pairs and bitmask-sorted rows from a neighbour table.
    NbrTable,
}

impl Shader {
    /// Every shader, for parse checks.
    pub const ALL: [Shader; 7] = [
        Shader::KmapHash,
        Shader::Conv,
        Shader::Scan,
        Shader::RadixSort,
        Shader::KmapSort,
        Shader::Elementwise,
        Shader::NbrTable,
    ];

    /// File name under `shaders/`.
    pub fn name(self) -> &'static str {
        match self {
            Shader::KmapHash => "kmap_hash.wgsl",
            Shader::Conv => "conv.wgsl",
            Shader::Scan => "scan.wgsl",
            Shader::RadixSort => "radix_sort.wgsl",
            Shader::KmapSort => "kmap_sort.wgsl",
            Shader::Elementwise => "elementwise.wgsl",
            Shader::NbrTable => "nbr_table.wgsl",
        }
    }

    /// The WGSL source.
    pub fn source(self) -> &'static str {
        match self {
            Shader::KmapHash => include_str!("../../shaders/kmap_hash.wgsl"),
            Shader::Conv => include_str!("../../shaders/conv.wgsl"),
            Shader::Scan => include_str!("../../shaders/scan.wgsl"),
            Shader::RadixSort => include_str!("../../shaders/radix_sort.wgsl"),
            Shader::KmapSort => include_str!("../../shaders/kmap_sort.wgsl"),
            Shader::Elementwise => include_str!("../../shaders/elementwise.wgsl"),
            Shader::NbrTable => include_str!("../../shaders/nbr_table.wgsl"),
        }
    }

    /// The source of a specialization: `variant` [`F16`] stores the conv's features and
    /// weights as f16 pairs packed in u32 words (core WGSL, no SHADER_F16 needed).
    pub fn source_variant(self, variant: u32) -> std::borrow::Cow<'static, str> {
        const PACKED: &str = "@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
fn load_x(i: u32) -> f32 { let p = unpack2x16float(x[i >> 1u]); return select(p.x, p.y, (i & 1u) == 1u); }
fn load_w(i: u32) -> f32 { let p = unpack2x16float(w[i >> 1u]); return select(p.x, p.y, (i & 1u) == 1u); }
";
        let src = self.source();
        match (self, variant, src.find("// BEGIN STORAGE\n"), src.find("// END STORAGE")) {
            (Shader::Conv, F16, Some(a), Some(b)) => format!("{}{PACKED}{}", &src[..a], &src[b..]).into(),
            _ => src.into(),
        }
    }

    /// Entry points the host dispatches.
    pub fn entries(self) -> &'static [&'static str] {
        match self {
            Shader::KmapHash => &["insert", "query"],
            Shader::Conv => &["main", "gather_gemm", "scatter_sum"],
            Shader::Scan => &["reduce", "scan"],
            Shader::RadixSort => &["count", "scatter"],
            Shader::KmapSort => &["keys", "query", "unique_flags", "compact"],
            Shader::Elementwise => &["concat", "pack_half", "row_sums", "fill_rows"],
            Shader::NbrTable => &[
                "row_masks",
                "permute_rows",
                "pair_flags",
                "pair_compact",
                "column_starts",
                "fill_empty",
                "transpose_scatter",
            ],
        }
    }
}

/// Specialization: half-precision storage (f32 accumulation).
pub const F16: u32 = 1;

/// What identifies a compiled pipeline: shader, entry point and a specialization value
/// (0 where the kernel has none). Two dispatches share a pipeline exactly when keys are equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    /// Kernel family.
    pub shader: Shader,
    /// Entry point in the shader.
    pub entry: &'static str,
    /// Specialization (e.g. a tile shape); 0 for none.
    pub variant: u32,
}

impl PipelineKey {
    /// Key of `entry` in `shader` without specialization.
    pub const fn new(shader: Shader, entry: &'static str) -> Self {
        Self { shader, entry, variant: 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shader_parses_and_validates() {
        for (s, variant) in Shader::ALL.iter().map(|&s| (s, 0)).chain([(Shader::Conv, F16)]) {
            let src = s.source_variant(variant);
            assert!(variant == 0 || src != s.source(), "variant {variant} of {} changes the source", s.name());
            let module = naga::front::wgsl::parse_str(&src)
                .unwrap_or_else(|e| panic!("{} variant {variant}: {}", s.name(), e.emit_to_string(&src)));
            naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
                .validate(&module)
                .unwrap_or_else(|e| panic!("{}: {e:?}", s.name()));
            for entry in s.entries() {
                assert!(module.entry_points.iter().any(|ep| ep.name == *entry), "{} lacks `{entry}`", s.name());
            }
        }
    }

    #[test]
    fn pipeline_keys_distinguish_shader_entry_and_variant() {
        use std::collections::HashSet;
        let keys = [
            PipelineKey::new(Shader::KmapHash, "insert"),
            PipelineKey::new(Shader::KmapHash, "query"),
            PipelineKey::new(Shader::Conv, "main"),
            PipelineKey { variant: 1, ..PipelineKey::new(Shader::Conv, "main") },
        ];
        assert_eq!(keys.iter().collect::<HashSet<_>>().len(), keys.len());
        assert_eq!(PipelineKey::new(Shader::Conv, "main"), keys[2], "same key, same pipeline");
    }
}
