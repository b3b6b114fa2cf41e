"""Pixel-data decoders for the transfer syntaxes CT archives use, and a size check before any decode.

pydicom decodes through plugins; which ones are installed decides what a PACS export loses. This project ships:

============================================  ==========================================  ===================
transfer syntax                               decoder                                     licence
============================================  ==========================================  ===================
Explicit/Implicit VR LE, Explicit VR BE       pydicom                                     MIT
Deflated Explicit VR LE                       pydicom (zlib)                              MIT
RLE Lossless                                  pylibjpeg-rle (pydicom's own as fallback)   MIT
JPEG 2000 (lossless and lossy)                pylibjpeg-openjpeg (OpenJPEG)               MIT (BSD-2)
JPEG-LS (lossless and near-lossless)          pyjpegls (CharLS)                           MIT (BSD-3)
JPEG Lossless (process 14, and SV1)           python-gdcm                                 BSD-3
JPEG Baseline (8-bit)                         python-gdcm, Pillow                         BSD-3, MIT-CMU
JPEG Extended (12-bit)                        python-gdcm, through :func:`_decode_frame`  BSD-3
============================================  ==========================================  ===================

pylibjpeg-libjpeg would decode the JPEG family too, but it is GPL-3.0: an image built with it would have to be
distributed under the GPL, which this Apache-2.0 project and its users' serving images should not inherit.
pydicom's GDCM plugin declines 12-bit JPEG Extended, which GDCM itself decodes; :func:`register` adds a plugin that
lets GDCM do it (tested against the values before lossy compression).

:func:`check_frame_size` reads the dimensions a compressed frame declares (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ)
and refuses a frame that disagrees with Rows × Columns, before a decoder allocates what the codestream asks for:
a 1.6 KB JPEG 2000 file can declare 16384² pixels behind a 128×128 header.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pydicom
from pydicom import uid
from pydicom.pixels.decoders.base import DecodeRunner

from blendsign.errors import ConfigError, UnusableFileError

try:
    import gdcm

    HAVE_GDCM = True
except ImportError:  # pragma: no cover - a dependency; without it the JPEG family is reported as undecodable
    HAVE_GDCM = False

PLUGIN = "blendsign-gdcm"
DECODER_DEPENDENCIES = {uid.JPEGExtended12Bit: ("python-gdcm>=3.0.10",)}

LOSSY_SYNTAXES = frozenset({uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLSNearLossless, uid.JPEG2000})
"""Syntaxes whose encoding may lose information (JPEG 2000 "lossy" may also hold a reversible codestream)."""


def is_available(transfer_syntax: str) -> bool:
    """pydicom's plugin interface: can :func:`_decode_frame` decode this syntax here?"""
    return HAVE_GDCM and transfer_syntax in DECODER_DEPENDENCIES


def _decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """One 12-bit JPEG Extended grey frame decoded by GDCM: the frame's samples as bytes (pydicom's plugin API)."""
    if runner.samples_per_pixel != 1:
        raise NotImplementedError("the blendsign GDCM plugin decodes grey (one sample) frames only")
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    elem = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    elem.SetValue(fragments.__ref__())
    img = gdcm.Image()
    img.SetNumberOfDimensions(2)
    img.SetDimensions((runner.columns, runner.rows, 1))
    img.SetDataElement(elem)
    pi = gdcm.PhotometricInterpretation.GetPIType(str(runner.photometric_interpretation))
    img.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(pi))
    img.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(str.__str__(runner.transfer_syntax))))
    bits = runner.bits_stored
    img.SetPixelFormat(gdcm.PixelFormat(1, runner.bits_allocated, bits, bits - 1, runner.pixel_representation))
    out = img.GetBuffer().encode("utf-8", "surrogateescape")  # GDCM hands back char* as str
    if len(out) != runner.rows * runner.columns * runner.bits_allocated // 8:
        raise UnusableFileError(f"GDCM decoded {len(out)} bytes for a {runner.rows}x{runner.columns} frame")
    return cast(bytes, out)


def register() -> None:
    """Add :func:`_decode_frame` to pydicom's JPEG Extended decoder (idempotent; called on import of
    :mod:`blendsign.dicom`, so ingest workers and the served model decode the same set)."""
    from pydicom.pixels.decoders import JPEGExtended12BitDecoder

    if HAVE_GDCM and PLUGIN not in JPEGExtended12BitDecoder.available_plugins:
        JPEGExtended12BitDecoder.add_plugin(PLUGIN, ("blendsign.codecs", "_decode_frame"))


# --- declared frame size -----------------------------------------------------------------------------------

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}  # 0xF7: JPEG-LS


def declared_size(frame: bytes) -> tuple[int, int] | None:
    """``(rows, columns)`` that a JPEG, JPEG-LS or JPEG 2000 frame declares in its header, or ``None`` when the
    frame is none of those or its header is cut short."""
    if frame[:2] == b"\xff\x4f" or frame[4:12] == b"jP  \r\n\x87\n":  # J2K codestream, or a JP2 file around one
        start = frame.find(b"\xff\x4f\xff\x51")
        if start < 0 or len(frame) < start + 24:
            return None
        siz = frame[start + 4 :]
        x, y, x0, y0 = (int.from_bytes(siz[i : i + 4], "big") for i in (4, 8, 12, 16))
        return y - y0, x - x0
    if frame[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(frame):
        if frame[i] != 0xFF:
            return None
        marker = frame[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(frame[i + 2 : i + 4], "big")
        if marker in _JPEG_SOF:
            if i + 9 > len(frame):
                return None
            return int.from_bytes(frame[i + 5 : i + 7], "big"), int.from_bytes(frame[i + 7 : i + 9], "big")
        i += 2 + length
    return None


def check_frame_size(frame: bytes, rows: int, cols: int, syntax_name: str) -> None:
    """Raise ``ValueError`` unless a compressed frame declares exactly ``rows × cols`` (before decoding it)."""
    size = declared_size(frame)
    if size is None:
        raise UnusableFileError(f"{syntax_name} data has no readable image header (truncated or not {syntax_name})")
    if size != (rows, cols):
        raise UnusableFileError(
            f"{syntax_name} data declares {size[0]}x{size[1]} pixels but the DICOM header says {rows}x{cols}"
        )


# --- re-encoding (test fixtures and benchmarks: a real slice stored the ways archives store it) ---------------

ENCODABLE = (
    uid.ExplicitVRBigEndian, uid.DeflatedExplicitVRLittleEndian, uid.RLELossless, uid.JPEGLossless,
    uid.JPEGLosslessSV1, uid.JPEGLSLossless, uid.JPEGLSNearLossless, uid.JPEG2000Lossless, uid.JPEG2000,
    uid.JPEGExtended12Bit,
)  # fmt: skip


def transcode(src: str | Path, dst: str | Path, syntax: str, *, near: int = 3, j2k_ratio: float = 20,
              quality: int = 90) -> None:
    """Write ``src`` (an uncompressed single-frame file) to ``dst`` in ``syntax``: pydicom encodes RLE, JPEG-LS
    (``near``: the largest error of near-lossless) and JPEG 2000 (``j2k_ratio``: the lossy compression ratio); GDCM
    transcodes to JPEG Lossless and 12-bit JPEG Extended (``quality``); pydicom writes deflated and big endian."""
    src, dst, syntax = str(src), str(dst), uid.UID(syntax)
    if syntax in (uid.JPEGLossless, uid.JPEGLosslessSV1, uid.JPEGExtended12Bit):
        reader = gdcm.ImageReader()
        reader.SetFileName(src)
        if not reader.Read():
            raise UnusableFileError(f"GDCM cannot read {src}")
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(str.__str__(syntax))))
        if syntax == uid.JPEGExtended12Bit:
            codec = gdcm.JPEGCodec()
            codec.SetLossless(False)
            codec.SetQuality(quality)
            change.SetUserCodec(codec)
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise UnusableFileError(f"GDCM cannot transcode {src} to {syntax.name}")
        writer = gdcm.ImageWriter()
        writer.SetFileName(dst)
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        if not writer.Write():
            raise UnusableFileError(f"GDCM cannot write {dst}")
        return
    ds = pydicom.dcmread(src)
    if syntax == uid.ExplicitVRBigEndian:
        ds.PixelData = ds.pixel_array.byteswap().tobytes()  # pydicom writes OW bytes as they are
        ds.file_meta.TransferSyntaxUID = syntax
        pydicom.dcmwrite(dst, ds, little_endian=False, implicit_vr=False, force_encoding=True)
    elif syntax == uid.DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = syntax
        ds.save_as(dst)
    elif syntax in ENCODABLE:
        kwargs: dict[str, Any] = {}
        if syntax == uid.JPEGLSNearLossless:
            kwargs["jls_error"] = near
        elif syntax == uid.JPEG2000:
            kwargs["j2k_cr"] = [j2k_ratio]
        ds.compress(syntax, generate_instance_uid=False, **kwargs)
        ds.save_as(dst)
    else:
        raise ConfigError(f"cannot encode {syntax.name}; encodable: {', '.join(u.name for u in ENCODABLE)}")
