"""Photos, captions, datasets, concepts, buckets and caches: one loader serves every recipe.

Modules (import them directly; this package imports nothing eagerly):

- `tune.data.config`   `DataConfig`, the loader's settings.
- `tune.data.images`   open a photo safely: bad-file reasons, EXIF orientation, any mode to RGB.
- `tune.data.captions` caption sidecars, caption shuffle / keep-N / dropout.
- `tune.data.concepts` `concepts/<name>/concept.toml` into a frozen `Concept`.
- `tune.data.buckets`  aspect-ratio buckets and crop boxes.
- `tune.data.masks`    a photo's subject mask (`-masklabel.png`) and the loss weights it gives.
- `tune.data.sources`  folders, `metadata.jsonl` folders and `datasets` datasets into image records.
- `tune.data.cache`    on-disk VAE latent and text-encoder caches (safetensors); `cache_latents` fills
  the latent one.
- `tune.data.text_cache` `cache_text`: the text one (SDXL: both encoders, pooled embeds too).
- `tune.data.dataset`  `build_dataset`: a source's checked photos as a `PhotoDataset`.
- `tune.data.batches`  `Batch`, the batch type of every recipe, and `collate`.
- `tune.data.loader`   `build_dataloader`: batch order, sharding, resume; re-exports what recipes
  call (`build_dataset`, `cache_latents`, `cache_text`, `Batch`).
- `tune.data.check`    `tune data check PATH`.
"""
