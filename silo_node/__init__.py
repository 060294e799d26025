"""Code that runs at an institution: the ClientApp, data, templates, local training, launch."""
