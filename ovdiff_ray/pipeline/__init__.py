"""The class pipeline on the models' device (`class_pipeline.ClassPipeline`) and its stages: batched MaskCut
(`maskcut`), instance maskers and the CRF pool (`instances`), fg/bg (`fgbg`), pooled prototypes (`pooling`),
deterministic k-means (`kmeans`)."""
