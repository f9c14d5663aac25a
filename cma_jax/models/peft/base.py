"""What a fine-tuning method declares, and the hooks through which it enters the two towers.

A method is a frozen dataclass: its fields are its hyper-parameters (`config.<section>`), its class
attributes, set by `declare`, the rest of its declaration (the variable type that trains, whether it starts
as the identity, the paper's count, its demo settings). It enters CLIP through the sites of a block: the
slots between sub-layers (`SLOTS`) and the named sub-layers themselves (`SUBLAYERS`: the q / k / v parts of
the fused in_proj, out_proj, the MLP's two projections, the LayerNorms), each module called the one way
`module(h, site)`; through CLIP-level modules handed to the tower hooks (`embed`, `layer_input`, `shared`);
and through `retype`. docs/methods.md says where each site sits ("How a method is declared") and where
prompt tokens go in the sequences.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx, struct

from cma_jax.models.params import TunedParam

# Between sub-layers: module(h, site) -> what goes on (parallel_adapter: what is added to the MLP's output).
SLOTS = ("pre_adapter", "attn_adapter", "mid_adapter", "parallel_adapter", "mlp_adapter")
# Named sub-layers: module(y, site) -> y', y the sub-layer's output, site.input what it read.
SUBLAYERS = ("q", "k", "v", "out", "mlp_in", "mlp_out", "ln_1", "ln_2")
SITES = SLOTS + SUBLAYERS
TOWERS = ("vision", "text")


class FieldError(ValueError):
    """A method's hyper-parameter that cannot work (on this architecture): `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@struct.dataclass
class TowerContext:
    """What a hook knows about the call: the tower, its depth, and for vision the [B, T] frame structure."""

    tower: str = struct.field(pytree_node=False)
    num_layers: int = struct.field(pytree_node=False)
    batch: int = struct.field(pytree_node=False)  # B: videos (vision) or captions (text)
    frames: int = struct.field(pytree_node=False, default=1)  # T (vision); the tower sees B * T images
    grid: int = struct.field(pytree_node=False, default=0)  # patches per side (vision)
    frame_mask: Any = None  # [B, T] bool (vision), True = a real frame


@dataclasses.dataclass(frozen=True)
class Site:
    """What a block hands the module a method placed at one of its sites (the one call signature).

    ctx: the call's tower context (frame structure); shared: this site's entry of the method's `shared`
    hook (the Cross-Modal Adapter's bank slice), or None; key: the module's dropout key, drawn by the block
    outside a rematerialised block (None: the module's own stream draws); input: a sub-layer's input.
    """

    ctx: TowerContext | None = None
    shared: Any = None
    key: Any = None
    input: Any = None


@dataclasses.dataclass(frozen=True)
class Demo:
    """A method's settings in the synthetic demo (cma_jax.demo): hyper-parameters scaled to its small CLIP
    (width 64, 2 layers per tower, 16-token context; the rest are the method's defaults), its learning rate
    and the rates its learning-rate search tries. A new method gets these defaults until its search ran."""

    fields: dict = dataclasses.field(default_factory=dict)
    lr: float = 1e-2
    lr_grid: tuple[float, ...] = (3e-3, 1e-2, 3e-2)


def declare(name: str, trainable=nnx.Nothing, *, label: str, formula: str = "0", paper: float | None = None,
            note: str = "", section: str | None = "", identity: bool = False, init_fields: tuple[str, ...] = (),
            config_fields: tuple[str, ...] | None = None, minimum: dict[str, int] | None = None,
            demo: Demo | None = None):
    """Class decorator: a method's declaration (the class attributes of `Method`, which say what each is).

    `section` defaults to the method's name when it has fields, None when it has none; `minimum` gives
    the least value of integer fields (checked at construction, FieldError naming the field).
    """
    def wrap(cls):
        has_fields = bool(dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else False
        cls.name, cls.trainable, cls.label, cls.formula, cls.paper_count = name, trainable, label, formula, paper
        cls.paper_note, cls.identity_at_init, cls.init_fields = note, identity, init_fields
        cls.section = (name if has_fields else None) if section == "" else section
        cls.config_fields, cls.minimums, cls.demo = config_fields, minimum or {}, demo or Demo()
        return cls
    return wrap


def at_least(method, minimum: int, *fields: str) -> None:
    """FieldError naming the first of `fields` below `minimum` (a method's own field checks)."""
    for f in fields:
        value = getattr(method, f)
        if value < minimum:
            raise FieldError(f, f"{method.name} {f} must be >= {minimum}, got {value}")


def within_layers(method, field: str, cfg) -> None:
    """FieldError when `field` (a number of layers or blocks) exceeds the shallower tower's layers."""
    shallow, value = min(cfg.vision_layers, cfg.text_layers), getattr(method, field)
    if value > shallow:
        raise FieldError(field, f"{method.name} {field} {value} exceeds the shallower tower's {shallow} layers")


@dataclasses.dataclass(frozen=True)
class Method:
    """Base declaration: a method that adds nothing and trains nothing (zero-shot CLIP); see `declare`."""

    name: ClassVar[str] = ""
    section: ClassVar[str | None] = None  # config section holding its fields (None: it has none)
    trainable: ClassVar[Any] = nnx.Nothing  # nnx filter of the variables that train
    identity_at_init: ClassVar[bool] = False  # True: step-0 embeddings equal the frozen CLIP's
    paper_count: ClassVar[float | None] = None  # trained params in the paper's MSR-VTT table (ViT-B/32)
    label: ClassVar[str] = ""  # the row name in the paper's tables
    formula: ClassVar[str] = "0"  # its trained-parameter count, in words (README, summary)
    paper_note: ClassVar[str] = ""  # what follows the paper's code, and where cma_jax chose
    # Fields read from `config.<section>`; None = every dataclass field.
    config_fields: ClassVar[tuple[str, ...] | None] = None
    # Fields that do not change what the trained weights mean (ignored when checkpoints are compared).
    init_fields: ClassVar[tuple[str, ...]] = ()
    minimums: ClassVar[dict[str, int]] = {}  # field -> its least value
    demo: ClassVar[Demo] = Demo()  # its settings in the synthetic demo

    def __post_init__(self):
        for f in dataclasses.fields(self):  # a list field (read back from JSON) as the tuple it was
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        for f, least in self.minimums.items():
            at_least(self, least, f)

    # --------------------------------------------------------------------- declaration
    @property
    def trains(self) -> bool:
        """False for a method with nothing to train (zero-shot): it can only be evaluated."""
        return self.trainable is not nnx.Nothing

    def check(self, cfg) -> None:
        """Raise ValueError when the method cannot be built on CLIP architecture `cfg`."""

    def count(self, cfg) -> int:
        """Trained parameters on architecture `cfg`, by the formula (tests hold it against the model)."""
        return 0

    def extra_text_tokens(self) -> int:
        """Tokens the method adds to a caption's sequence (they count against the context length)."""
        return 0

    def to_dict(self) -> dict:
        """Its hyper-parameters (what a checkpoint records)."""
        return dataclasses.asdict(self)

    def architecture(self) -> dict:
        """The fields that define the trained weights (compared when checkpoints are restored)."""
        return {k: v for k, v in self.to_dict().items() if k not in self.init_fields}

    # --------------------------------------------------------------------- construction
    def block_modules(self, tower: str, layer: int, num_layers: int, width: int, dtype, rngs: nnx.Rngs) -> dict:
        """{site: module} for block `layer` of `tower` (sites of SITES: slots and named sub-layers), each
        called `module(h, site: Site)`; created after the block's own weights."""
        return {}

    def clip_modules(self, cfg, rngs: nnx.Rngs) -> dict:
        """{attribute: module} set on the CLIP module, after the backbone's weights."""
        return {}

    def retype(self, clip) -> None:
        """Re-type the pre-trained weights this method trains as `TunedParam` (in place)."""

    def merge(self, clip) -> None:
        """Fold what the method trained into the backbone weights of `clip`, in place (`python -m cma_jax.convert
        merge`): nothing to do when those are backbone weights already (partial, projection, full)."""
        if self.trainable not in (TunedParam, nnx.Param):
            raise ValueError(f"method {self.name} adds modules that cannot be folded into CLIP's weights; "
                             "merging takes lora, partial, projection or full")

    # --------------------------------------------------------------------- forward hooks
    def embed(self, modules: dict, ctx: TowerContext, x: jax.Array) -> jax.Array:
        """The token sequence before the first block: vision [B*T, 1+g*g, W] after the positional
        embedding and before ln_pre; text [B, L, W] token embeddings before the positional embedding."""
        return x

    def layer_input(self, modules: dict, ctx: TowerContext, layer: int, x: jax.Array) -> jax.Array:
        """The sequence entering block `layer` (deep prompts replace their tokens here)."""
        return x

    def shared(self, modules: dict, ctx: TowerContext, layer: int) -> dict | None:
        """{site: module} that block `layer`'s modules share with the other tower (the Cross-Modal Adapter's
        bank), handed to each site as `Site.shared`; None when nothing is shared."""
        return None


class TowerHooks:
    """A method's hooks bound to one call of one tower (built inside the traced call, not a module)."""

    def __init__(self, method: Method, modules: dict, ctx: TowerContext):
        self.method, self.modules, self.ctx = method, modules, ctx

    def embed(self, x):
        return self.method.embed(self.modules, self.ctx, x)

    def layer_input(self, layer: int, x):
        return self.method.layer_input(self.modules, self.ctx, layer, x)

    def shared(self, layer: int):
        return self.method.shared(self.modules, self.ctx, layer)


def bottleneck_count(width: int, r: int) -> int:
    """Parameters of one width -> r -> width bottleneck with biases: 2 W r + r + W."""
    return 2 * width * r + r + width


def block_count(width: int) -> int:
    """Parameters of one CLIP transformer block: 2 LayerNorms, qkv + out projections, the 4x MLP: 12 W^2 + 13 W."""
    return 12 * width * width + 13 * width


def backbone_count(cfg) -> int:
    """Parameters of CLIP architecture `cfg` (both towers, embeddings, projections, logit_scale)."""
    wv, wt, g = cfg.vision_width, cfg.text_width, cfg.grid
    vision = (3 * cfg.vision_patch_size ** 2 * wv + wv + (g * g + 1) * wv + 2 * wv
              + cfg.vision_layers * block_count(wv) + 2 * wv + wv * cfg.embed_dim)
    text = (cfg.vocab_size * wt + cfg.context_length * wt + cfg.text_layers * block_count(wt) + 2 * wt
            + wt * cfg.embed_dim)
    return vision + text + 1


def torch_linear(rngs: nnx.Rngs, din: int, dout: int, param: type[nnx.Param], bias: bool = True):
    """(kernel [din, dout], bias [dout] or None) with PyTorch's nn.Linear init: U(-1/sqrt(din), 1/sqrt(din))
    (the methods whose code keeps PyTorch's default init: MaPLe's couplings, ST-Adapter's fc layers)."""
    bound = 1.0 / math.sqrt(din)
    kernel = param(jax.random.uniform(rngs.params(), (din, dout), jnp.float32, -bound, bound))
    return kernel, (param(jax.random.uniform(rngs.params(), (dout,), jnp.float32, -bound, bound)) if bias else None)
