"""Video latent spaces (VAEs) and text encoders, real and tiny.

Two latent spaces share one interface (:class:`VideoCodec`, with exact streaming decode):

* :class:`WanVAE` -- the Wan causal 3D VAEs (``diffusers.AutoencoderKLWan``) loaded from a LOCAL
  directory: Wan2.1's (4x temporal / 8x spatial, 16 latent channels) and Wan2.2's (4x / 16x with its
  2x2 patchify, 48 channels); Wan latent normalization.
* :class:`PixelShuffleVAE` -- a parameter-free, exactly invertible space-to-depth "latent space" for
  the tiny CPU default (32x32 synthetic video -> 48 x 8 x 8 latents with ``factor=4``).

Two text encoders share one interface (``encode(list[str]) -> [B, text_len, text_dim]``):
:class:`UMT5TextEncoder` (Wan's, from a LOCAL directory) and :class:`HashTextEncoder` (tiny).

Modules: ``common`` (load error, device placement), ``codec`` (VideoCodec, DecodeState),
``wan_vae``, ``pixel_shuffle``, ``text`` (umT5, hash, prompt_clean), ``builders`` (build_vae,
build_text_encoder, text_dtype: the text encoder's one dtype rule). Every public name is re-exported here.
"""
from .builders import TEXT_KINDS, VAE_KINDS, build_text_encoder, build_vae, text_dtype
from .codec import DecodeState, VideoCodec
from .common import EncoderLoadError
from .pixel_shuffle import PixelShuffleVAE
from .text import HashTextEncoder, UMT5TextEncoder, prompt_clean
from .wan_vae import WanVAE

__all__ = [
    "EncoderLoadError",
    "DecodeState",
    "VideoCodec",
    "WanVAE",
    "PixelShuffleVAE",
    "UMT5TextEncoder",
    "HashTextEncoder",
    "VAE_KINDS",
    "TEXT_KINDS",
    "build_vae",
    "build_text_encoder",
    "text_dtype",
    "prompt_clean",
]
