# Grand Challenge algorithm container for an nnpre detector (see nnpre/challenge.py).
#   docker build -t my-detector --build-arg MODEL=path/to/fold_0 .
#   docker run --rm --gpus all -v $PWD/job:/input:ro -v $PWD/out:/output my-detector
# MODEL is the fold folder of a `nnPre_train detect` run, relative to the build context.
FROM pytorch/pytorch:2.4.1-cuda12.1-cudnn9-runtime

ARG MODEL=model
ENV PYTHONUNBUFFERED=1 nnUNet_raw=/tmp/nnUNet_raw nnUNet_preprocessed=/tmp/nnUNet_preprocessed \
    nnUNet_results=/tmp/nnUNet_results

WORKDIR /opt/nnpre/src
COPY setup.py README.md ./
COPY nnpre ./nnpre
COPY nnpre_trainers ./nnpre_trainers
COPY nnpre_detection ./nnpre_detection
COPY planners ./planners
RUN pip install --no-cache-dir .

COPY ${MODEL} /opt/nnpre/model

# Grand Challenge runs containers as an unprivileged user; /output is mounted writable.
RUN useradd -m -U user
USER user
ENTRYPOINT ["nnPre_challenge", "-m", "/opt/nnpre/model", "--input", "/input", "--output", "/output"]
