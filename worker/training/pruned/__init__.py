"""Pruned-transformer students: the teacher's encoder cut to chosen layers (:mod:`.encoder`),
distilled (:mod:`.distil`) and published as a model directory (:mod:`.run`)."""
