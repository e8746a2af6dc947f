"""Model configuration: one plain dataclass, named presets, and the paper's ablations as fields.

Every invalid combination fails at construction with a message naming the field, so that a bad config never
reaches a 64-GPU job.
"""

from dataclasses import asdict, dataclass, replace
from typing import Any

# How the generator's heads are mixed into the one distribution that replaced tokens are sampled from.
MIXTURES = (
    "adversarial",  # AMOS: gamma = softmax(v . f(d)), learned through the reversed Gumbel-Softmax gradient
    "uniform",  # ablation "- adv. train": gamma = 1/K, v gets no gradient
    "random_layer",  # ablation "w. random layer": one head drawn uniformly per masked position
    "layer_switch",  # ablation "w. layer switch": head k alone from progress switch_points[k-1] on
)
# The vocabulary path's implementations, amos_ds.ops.mlm_and_sample's `impl` (ops.IMPLS is this tuple).
VOCAB_IMPLS = ("auto", "torch", "chunked", "triton")
# How attention adds the relative bias (amos_ds/model/encoder.py): PyTorch's scaled_dot_product_attention with the
# bias as a contiguous additive mask, or FlexAttention with the bias as a score_mod (no attention dropout).
ATTENTION_IMPLS = ("sdpa", "flex")


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and switches of one AMOS model: generator, mixture, and discriminator.

    Layer indices in `head_layers` are 1-based, as in the paper ("heads at layers 4, 6 and 8").
    """

    vocab_size: int = 32768
    hidden_size: int = 768
    num_heads: int = 12
    ffn_size: int = 3072
    disc_layers: int = 12
    gen_layers: int = 8
    head_layers: tuple[int, ...] = (4, 6, 8)
    max_positions: int = 512
    rel_buckets: int = 32
    rel_max_distance: int = 128
    dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    # Training criterion.
    rtd_weight: float = 50.0
    gumbel_tau: float = 0.3
    # Ablations (paper Table 2 and Table 9).
    mixture: str = "adversarial"
    switch_points: tuple[float, ...] = (1 / 3, 2 / 3)
    adv_mlm_scale: float = 0.0
    stop_gradient: bool = True
    separate_generators: bool = False
    # Which implementation of the vocabulary path (amos_ds.ops.mlm_and_sample) the model calls.
    vocab_impl: str = "auto"
    # Which attention kernel adds the relative bias (ATTENTION_IMPLS); "flex" needs attention_dropout 0.
    attention_impl: str = "sdpa"

    def __post_init__(self) -> None:
        # Lists from JSON become tuples, so configs stay hashable and comparable.
        object.__setattr__(self, "head_layers", tuple(self.head_layers))
        object.__setattr__(self, "switch_points", tuple(self.switch_points))
        self._validate()

    def _validate(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"ModelConfig.{name}: {why}")

        for name in ("vocab_size", "hidden_size", "num_heads", "ffn_size", "disc_layers", "gen_layers",
                     "max_positions", "rel_buckets", "rel_max_distance"):
            if getattr(self, name) < 1:
                fail(name, f"must be at least 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            fail("hidden_size", f"{self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.rel_buckets % 2:
            fail("rel_buckets", f"must be even (half for each direction), got {self.rel_buckets}")
        if not self.head_layers:
            fail("head_layers", "needs at least one MLM head layer")
        if list(self.head_layers) != sorted(set(self.head_layers)):
            fail("head_layers", f"must be strictly increasing, got {self.head_layers}")
        if self.head_layers[0] < 1 or self.head_layers[-1] > self.gen_layers:
            fail("head_layers", f"{self.head_layers} must lie within the generator's layers 1..{self.gen_layers}")
        if self.head_layers[-1] != self.gen_layers:
            fail("gen_layers", f"{self.gen_layers} layers but the deepest head is at {self.head_layers[-1]}: "
                               "layers above it would never train")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                fail(name, f"must be in [0, 1), got {getattr(self, name)}")
        if self.gumbel_tau <= 0:
            fail("gumbel_tau", f"must be positive, got {self.gumbel_tau}")
        if self.rtd_weight < 0:
            fail("rtd_weight", f"must be non-negative, got {self.rtd_weight}")
        if self.mixture not in MIXTURES:
            fail("mixture", f"{self.mixture!r} is not one of {MIXTURES}")
        if self.mixture == "layer_switch":
            if len(self.switch_points) != self.num_generator_heads - 1:
                fail("switch_points", f"needs {self.num_generator_heads - 1} points for "
                                      f"{self.num_generator_heads} heads, got {self.switch_points}")
            if list(self.switch_points) != sorted(self.switch_points) or not all(
                    0.0 < p < 1.0 for p in self.switch_points):
                fail("switch_points", f"must be increasing fractions of training in (0, 1), got {self.switch_points}")
        if self.adv_mlm_scale < 0:
            fail("adv_mlm_scale", f"must be non-negative, got {self.adv_mlm_scale}")
        if self.adv_mlm_scale and self.mixture != "adversarial":
            fail("adv_mlm_scale", "the adversarial MLM gradient needs mixture='adversarial'")
        if self.vocab_impl not in VOCAB_IMPLS:
            fail("vocab_impl", f"{self.vocab_impl!r} is not one of {VOCAB_IMPLS}")
        if self.attention_impl not in ATTENTION_IMPLS:
            fail("attention_impl", f"{self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
        if self.attention_impl == "flex" and self.attention_dropout:
            fail("attention_impl", f"'flex' cannot drop attention probabilities: set attention_dropout 0.0 with it "
                                   f"(got {self.attention_dropout}), or use 'sdpa'")

    @property
    def num_generator_heads(self) -> int:
        return len(self.head_layers)

    @property
    def generator_layers_run(self) -> int:
        """Generator layers one forward runs: the shared generator's, or with separate generators all of theirs."""
        return sum(self.head_layers) if self.separate_generators else self.gen_layers

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {sorted(unknown)}")
        return cls(**values)

    def replace(self, **changes: Any) -> "ModelConfig":
        return replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    # Unit tests (a few milliseconds a step) and the README's main job on the CPU (ds_configs/cpu.json).
    "tiny": ModelConfig(vocab_size=1024, hidden_size=64, num_heads=4, ffn_size=128, disc_layers=2, gen_layers=3,
                        head_layers=(1, 2, 3), max_positions=128, rel_buckets=16, rel_max_distance=32),
    # CPU benchmarks.
    "small": ModelConfig(vocab_size=8192, hidden_size=256, num_heads=4, ffn_size=1024, disc_layers=4, gen_layers=4,
                         head_layers=(2, 3, 4), max_positions=128),
    # The paper's base setting (Table 5): BERT-base discriminator, 8-layer generator with heads at 4/6/8; 64
    # relative buckets up to distance 128, as the authors' released checkpoint (microsoft/AMOS fairseq/run_glue.sh).
    "base": ModelConfig(rel_buckets=64),
    # base++: same shapes, 64K cased vocabulary.
    "base_plus_plus": ModelConfig(vocab_size=64000, rel_buckets=64),
}

# Named ablations from the paper's Table 2 and Table 9, applied on top of a preset.
ABLATIONS: dict[str, dict[str, Any]] = {
    "random_layer": dict(mixture="random_layer"),
    "layer_switch": dict(mixture="layer_switch"),
    "no_adv_train": dict(mixture="uniform"),
    "adv_mlm": dict(adv_mlm_scale=0.1),
    "no_stop_grad": dict(stop_gradient=False),
    "separate_generators": dict(separate_generators=True),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset, with any field overridden (e.g. `get_preset("base", head_layers=(2, 4, 6, 8))`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


def single_generator(config: ModelConfig, depth: int) -> ModelConfig:
    """The ELECTRA/COCO-LM-style baseline: one generator of `depth` layers, one head, no mixture."""
    return config.replace(gen_layers=depth, head_layers=(depth,), mixture="uniform", separate_generators=False)


def with_ablation(config: ModelConfig, name: str) -> ModelConfig:
    """`config` with one named ablation applied; `single_gen_D` gives the single D-layer generator baseline."""
    if name.startswith("single_gen_"):
        return single_generator(config, int(name.removeprefix("single_gen_")))
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {name!r}: choose one of {sorted(ABLATIONS)} or single_gen_<depth>")
    return config.replace(**ABLATIONS[name])


__all__ = ["ModelConfig", "PRESETS", "ABLATIONS", "ATTENTION_IMPLS", "MIXTURES", "get_preset", "single_generator",
           "with_ablation"]
