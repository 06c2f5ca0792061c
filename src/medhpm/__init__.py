"""medhpm: selfMedHPM self-pre-training of 3D ViTs on CT and UNETR fine-tuning."""

__version__ = "0.1.0"
