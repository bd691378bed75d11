"""Which JPEGs a GPU decoder refuses, read from the header alone (no decoding).

nvJPEG (torchvision's `decode_jpeg(device='cuda')`, DALI's "mixed" decoder) handles baseline Huffman JPEGs with one
or three components and the usual chroma subsampling (4:4:4, 4:2:2, 4:4:0, 4:2:0). ImageNet and IN-21k also hold
progressive and CMYK files and odd subsamplings (4:1:1, chroma sampled finer than luma); those go to the CPU.
"""

from __future__ import annotations

_BASELINE = (0xC0, 0xC1)  # SOF0 baseline, SOF1 extended sequential (Huffman)
_NOT_SOF = (0xC4, 0xC8, 0xCC)  # DHT, JPG extension, DAC share the 0xC_ range
_LUMA = ((1, 1), (2, 1), (1, 2), (2, 2))


def frame_info(data) -> tuple[int, int, list[tuple[int, int]]] | None:
    """(SOF marker, components, [(h, v) sampling per component]) of a JPEG's frame header, or None."""
    data = memoryview(data).cast("B")
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if 0xC0 <= marker <= 0xCF and marker not in _NOT_SOF:
            if i + 2 + length > n or length < 8:
                return None
            components = data[i + 9]
            if length < 8 + 3 * components:
                return None
            sampling = [(data[i + 11 + 3 * k] >> 4, data[i + 11 + 3 * k] & 15) for k in range(components)]
            return marker, components, sampling
        if marker == 0xDA:  # scan data before any frame header
            return None
        i += 2 + length
    return None


def gpu_refusal(data) -> str | None:
    """Why a GPU decoder would refuse this JPEG ("progressive", "CMYK", "subsampling 4x1", ...), or None."""
    info = frame_info(data)
    if info is None:
        return "unreadable header"
    marker, components, sampling = info
    if marker in (0xC2, 0xC6, 0xCA, 0xCE):
        return "progressive"
    if marker not in _BASELINE:
        return "lossless/arithmetic/hierarchical"
    if components == 4:
        return "CMYK"
    if components not in (1, 3):
        return f"{components} components"
    if components == 3 and (sampling[0] not in _LUMA or sampling[1] != (1, 1) or sampling[2] != (1, 1)):
        return "subsampling " + " ".join(f"{h}x{v}" for h, v in sampling)
    return None
