"""What goes into a model: tokenizers, images, datasets, and the processor that turns text and images
into model inputs the way the spec's prompt template and token counts say."""
