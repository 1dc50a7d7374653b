"""Data: the offline shapes dataset, image-text folders, and the grain pipeline per stage.

Import the submodules directly (`from imagen_jax.data import pipeline, shapes`); importing this
package loads nothing heavy.
"""
