"""The input pipeline, by responsibility.

`image_folder` reads ``root/<split>/<class>/<image>`` trees; `sources` turns a folder or a TFDS
split into indexed examples (optionally cached in memory); `crops` samples the random-resized
and centre crops; `resolution` holds every image-size rule; `pipeline` builds the pretraining
and evaluation tf.data streams and places their batches on the devices.
"""
