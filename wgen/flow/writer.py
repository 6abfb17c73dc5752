"""Write decoded samples as safetensors files without building them: one header for all, one row each.

Every sample of a generator has the same tensor names, shapes and dtypes, so its ``model.safetensors``
differs from any other only in the float values. :class:`PackedLayout` asks ``safetensors`` once for
the file of a template state dict and splits it into the bytes every sample shares (header, integer
buffers) and the float region. A ``Layout`` sorts tensors by name, as safetensors stores them, so the
float region is exactly a decoded vector (variances exponentiated): each file is written as shared
bytes + one row of the batch, byte for byte what ``safetensors.torch.save`` writes for that state
dict. A layout in another order (a generator from wgen 0.1) costs one gather per batch.
"""

from __future__ import annotations

import json
import sys

import safetensors.torch
import torch

from .spaces.base import Layout

_F32 = 4  # bytes per float32 value


class PackedLayout:
    """The bytes every sample's ``model.safetensors`` shares, and where a decoded vector's values go."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        template = layout.unflatten(torch.zeros(layout.dim))
        blob = safetensors.torch.save({k: v.contiguous() for k, v in template.items()}, metadata={"format": "pt"})
        data_start = 8 + int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8:data_start])
        destination = torch.empty(layout.dim, dtype=torch.long)  # float index in the file of each vector value
        for slot in layout.slots:
            begin, _ = header[slot.key]["data_offsets"]
            if header[slot.key]["dtype"] != "F32" or begin % _F32:  # never seen: safetensors aligns by dtype
                raise ValueError(f"{slot.key}: unexpected safetensors placement {header[slot.key]}")
            destination[slot.offset:slot.offset + slot.size] = torch.arange(slot.size) + begin // _F32
        first = int(destination.min())
        in_file_order = torch.arange(first, first + layout.dim)
        if not torch.equal(destination.sort().values, in_file_order):  # never seen: safetensors groups by dtype
            raise ValueError("the float tensors are not one block of the safetensors file")
        self._order = None if torch.equal(destination, in_file_order) else \
            destination.argsort()  # the vector index of each file value
        region = (data_start + first * _F32, data_start + (first + layout.dim) * _F32)
        self._before, self._after = blob[:region[0]], blob[region[1]:]  # header and integer buffers
        self._little_endian = sys.byteorder == "little"  # safetensors stores little-endian values

    def pack(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the float regions ``[N, layout.dim]`` (CPU) of raw vectors, and ``[N]`` flags: all values finite.

        ``vectors`` hold ``running_var`` as its log (``Layout.flatten`` form); they are exponentiated
        in place, so pass a tensor you no longer need.
        """
        for slot in self.layout.slots:
            if slot.log:
                vectors[:, slot.offset:slot.offset + slot.size].exp_()
        # amax/amin carry NaN and inf through, and run ~15x faster than isfinite().all() on CPU
        finite = (torch.isfinite(vectors.amax(dim=1)) & torch.isfinite(vectors.amin(dim=1))).cpu()
        values = vectors if self._order is None else vectors[:, self._order.to(vectors.device)]
        return values.to("cpu", torch.float32).contiguous(), finite

    def state(self, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return the state dict of one packed row (views into it when the layout is in file order)."""
        stacked = self.stacked(values[None])
        return {key: value[0].clone() if key in self.layout.fixed else value[0] for key, value in stacked.items()}

    def stacked(self, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return the state dicts of packed rows ``[N, dim]`` stacked: ``{name: [N, *shape]}``, views where possible."""
        vectors = values if self._order is None else torch.empty_like(values).index_copy_(1, self._order, values)
        n = len(values)
        stacked = {slot.key: vectors[:, slot.offset:slot.offset + slot.size].view(n, *slot.shape)
                   for slot in self.layout.slots}
        stacked.update({key: value.expand(n, *value.shape) for key, value in self.layout.fixed.items()})
        return stacked

    def file_chunks(self, values: torch.Tensor) -> list[bytes | memoryview]:
        """Return the ``model.safetensors`` bytes of one packed row, in chunks to write one after another."""
        if not self._little_endian:
            return [safetensors.torch.save(self.state(values), metadata={"format": "pt"})]
        return [self._before, memoryview(values.numpy()).cast("B"), self._after]
