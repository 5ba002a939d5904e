"""Optional steps, off the main path: embeddings, restoration, test-shift tools, pseudo-labels, label issues,
`tune-train`, and the levers measured flat or harmful (Mixup / CutMix, damage consistency, BatchNorm adaptation,
stain normalisation). The main path reaches the levers only through `wbc.core.hooks`; nothing of it imports this
package."""
