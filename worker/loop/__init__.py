"""The offline loop: the labelling job, seeding, versioned datasets and their store,
augmentation, the lexicon, and the promotion gate."""
