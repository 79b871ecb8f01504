"""genedml: the library the five top-level files use (it imports none of them).

Read model.py, losses.py, data.py, train.py and evaluate.py first; come here for what they lean on.

    trunk          the ResNet18 trunk and its weights: none, imagenet, or a checkpoint
    packing        the global level over a step's sections as one batch (model.GlobalEncoder's batched form)
    encoders       the frozen encoders: ResNet18, UNI, UNI2-h, H-optimus-0, Virchow2, Prov-GigaPath, timm models
    features       what a frozen encoder sees once per slide: tile and spot features, local token maps
    crops          each spot's crop, cut once per slide and cached; the 8 flips / rotations; a crop's field of view
    cohorts        the published cohorts (her2st, cSCC, STNet): folds, files, readers, `Section`
    cache          the on-disk array cache (memory-mapped, keyed by content, atomic)
    checkpoint     atomic checkpoint writes, the background writer, safe loading, resume checks
    metrics        PCC(M), PCC(H), per-gene Pearson
    distributed    several processes under torchrun: DDP, the all-gather, sharded batches
    cli            the help formatter and flag checks train.py and evaluate.py share
    runtime        the one CUDA set-up, loader workers sized to /dev/shm, --compile of the step
    resident       the training set kept on the device (--data-on-device): the loader's batches, gathered there
    demo           the synthetic demo cohort (`python data.py demo`)
    download       the resumable her2st downloader (`python data.py download`)
    visium         your own Visium / HEST-1k slides as a cohort table (`python -m genedml.visium info`)
    visium_files   reading Space Ranger and HEST-1k files
    slide          whole slides: OpenSlide / PIL readers, tissue detection, the virtual spot grid
    prediction     slides without counts: the spots to predict, the AnnData assembled
    h5ad           AnnData's on-disk format, written with h5py alone
"""
