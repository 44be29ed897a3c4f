"""The papers' recipes, each owned once by the library: the steps of one analysis (build the prompt sets, fit,
sweep, choose on validation, evaluate once on test, write the tables), one module per analysis. The scripts in
``analyses/`` are pages over these steps: load, call the steps, save tables.

Importing this package touches no disk, network or device; each recipe module imports the heavy libraries it needs
when its steps run."""
