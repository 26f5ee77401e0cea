"""Vision-language pillar: CLIP dual encoders and LightCLIP (softened negatives, token-level
matching, fusion-assisted MLM). See docs/lightclip.md."""
