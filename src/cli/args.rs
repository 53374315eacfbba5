//! Choice arguments shared by the commands, as clap value enums: `--help` lists the values and
//! clap refuses a typo before a command runs. Each spells its values as the library parses
//! them (`as_str`), so the commands hand the library the same words as before.

use clap::ValueEnum;

/// A closed set of argument values with their command-line spelling.
macro_rules! choice {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
        pub enum $name {
            $($(#[$vdoc])* #[value(name = $text)] $variant),+
        }

        impl $name {
            /// The value as written on the command line.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            /// The library's type for this value, parsed from the same spelling.
            #[allow(dead_code)]
            pub fn parse<T: std::str::FromStr>(self) -> Result<T, T::Err> {
                self.as_str().parse()
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

choice!(
    /// Where convs run.
    DeviceArg {
        /// The CPU (rayon threads, AVX-512 where present).
        Cpu = "cpu",
        /// A GPU through wgpu (Vulkan, Metal, DX12; SPARSECONV_ADAPTER picks one by name).
        Gpu = "gpu",
    }
);

choice!(
    /// Conv precision.
    PrecisionArg {
        /// f32 everywhere.
        F32 = "f32",
        /// GPU: packed halves, f32 accumulation.
        F16 = "f16",
        /// CPU: bf16 features and weights, f32 sums (AVX512_BF16).
        Bf16 = "bf16",
    }
);

choice!(
    /// Segmentation network.
    ArchArg {
        /// MinkUNet (TorchSparse/SPVNAS names).
        MinkUNet = "minkunet",
        /// SPVCNN: MinkUNet with a point branch.
        Spvcnn = "spvcnn",
    }
);

choice!(
    /// How points become voxels.
    VoxelizeArg {
        /// Floor to the grid, mean features.
        Mean = "mean",
        /// SPVNAS: rounded coordinates, the first point's features.
        Spvnas = "spvnas",
    }
);

choice!(
    /// Point file format.
    PointFormatArg {
        /// KITTI/SemanticKITTI `.bin`: f32 x, y, z, remission.
        Kitti = "kitti",
        /// nuScenes `.pcd.bin`: f32 x, y, z, intensity, ring.
        NuScenes = "nuscenes",
        /// PLY (ASCII or binary) with x, y, z and optional intensity.
        Ply = "ply",
        /// NumPy `[N, D>=3]`.
        Npy = "npy",
        /// ASPRS LAS or LAZ (re-centred, intensity scaled to [0, 1]).
        Las = "las",
    }
);

choice!(
    /// Channel importance.
    CriterionArg {
        /// L1 norm of each channel's weights.
        L1 = "l1",
        /// L2 norm.
        L2 = "l2",
        /// |BatchNorm γ| (network slimming).
        Bn = "bn",
        /// First-order Taylor on labelled scans (--data).
        Taylor = "taylor",
        /// Random (a baseline).
        Random = "random",
    }
);

choice!(
    /// What `prune` removes.
    PruneGranularityArg {
        /// Whole channels of dependency groups: a physically smaller network.
        Channel = "channel",
        /// Whole kernel offsets of convs: their pairs are skipped.
        Offset = "offset",
        /// Single weights (CPU sparse kernels).
        Element = "element",
        /// 1×16 weight blocks.
        Block = "block",
        /// N of every M along Cin (see --nm).
        Nm = "nm",
    }
);

choice!(
    /// What an AMC budget counts.
    BudgetArg {
        /// Conv FLOPs on the first evaluation scan.
        Flops = "flops",
        /// Latency predicted by the table.
        Latency = "latency",
    }
);

choice!(
    /// AMC's episode reward.
    RewardArg {
        /// −error (AMC's for a budget the action wall enforces).
        Error = "error",
        /// −error · ln cost.
        ErrorLogCost = "error-log-cost",
    }
);

choice!(
    /// How iterative pruning's sparsity grows.
    ScheduleArg {
        /// Zhu & Gupta's cubic schedule.
        Agp = "agp",
        /// Equal steps.
        Fixed = "fixed",
        /// --rate of what is left per round (lottery tickets).
        Geometric = "geometric",
    }
);

choice!(
    /// What each iterative-pruning round trains from.
    RestartArg {
        /// The previous round's weights.
        Finetune = "finetune",
        /// The weights at --rewind-step (lottery tickets).
        Rewind = "rewind",
        /// A fresh random initialization.
        Reinit = "reinit",
    }
);
