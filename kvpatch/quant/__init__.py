"""K/V compression: fixed-rate codes (`Codes`), bit packing, and the quantizer stage base.

Quantizer stages (`quantizer/kivi`, `quantizer/fibquant`) live in `kvpatch/stages/`; the cache
layer that stores their codes is the `storage/quantized` stage.
"""

from .base import QuantizerStage, Role
from .codes import Codes
from .packing import pack_bits, unpack_bits

__all__ = ["Codes", "QuantizerStage", "Role", "pack_bits", "unpack_bits"]
